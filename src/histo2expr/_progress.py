"""Progress bars: a widget in notebooks that can draw one, plain text everywhere else, never a warning."""

from __future__ import annotations

import importlib.util
from typing import Any

#: Seconds between two redraws of a text bar (a notebook stores every redraw in its output).
_MIN_INTERVAL = 1.0


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm progress bar: tqdm's notebook widget when ipywidgets is installed, else a text bar.

    ``tqdm.auto`` warns (``TqdmWarning: IProgress not found``) in a notebook without ipywidgets;
    this picks the text bar there instead, redrawn at most once a second. Keyword arguments go to
    tqdm (``total``, ``desc``, ``disable``, ...).
    """
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    kwargs.setdefault("mininterval", _MIN_INTERVAL)
    return tqdm(iterable, **kwargs)
