"""Docstring fragments of the parameters many public functions share, written once (as scanpy's ``_docs``).

A docstring names a fragment as ``{key_param}`` (the names of ``_FRAGMENTS``), indented as the
parameter it replaces; :func:`fill_docs` puts the fragment there. Fragments hold the text after that first
indentation, with their further lines indented as in a function's Parameters section.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: ``key``: the results a plot reads.
KEY = """\
key
        The ``key_added`` of the fit (default: that of :func:`~histo2expr.tl.fit_histo2expr`) or of
        the prediction (that of :func:`~histo2expr.tl.predict_expression` is ``"histo2expr_pred"``)."""
#: ``key`` of plots that compare methods: one key or several.
KEYS = """\
key
        The ``key_added`` of the fit, or a list of them to compare methods."""
#: ``slide_key``: the column of the slides.
SLIDE_KEY = """\
slide_key
        Column of ``obs`` with the slide of each spot."""
#: ``ax`` of a plot of one panel.
AX = """\
ax
        Axes to draw into (default: a new figure)."""
#: ``show``, ``save`` and ``return_fig``, as in scanpy.
SHOW_SAVE = """\
show
        Show the figure (:func:`matplotlib.pyplot.show`); by default when the plot made its own
        figure (no ``ax``) and ``return_fig`` is not set.
    save
        Save the figure into ``scanpy.settings.figdir``, as scanpy's plots do: ``True`` names the
        file after the plot, a string is appended to that name (``save="_her2st.pdf"``: a ``.png``,
        ``.pdf`` or ``.svg`` ending sets the format, else ``scanpy.settings.file_format_figs``).
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the Axes."""
#: The return value of every plot.
RETURNS = """\
With ``return_fig``, the Figure; else, when the figure is not shown, the Axes"""

_FRAGMENTS = {
    "key_param": KEY,
    "keys_param": KEYS,
    "slide_key_param": SLIDE_KEY,
    "ax_param": AX,
    "show_save_params": SHOW_SAVE,
    "plot_returns": RETURNS,
}
_PLACEHOLDER = re.compile(r"\{(" + "|".join(_FRAGMENTS) + r")\}")


def fill_docs(function: F) -> F:
    """Replace the ``{name}`` placeholders of ``function``'s docstring by the shared fragments."""
    if function.__doc__:
        function.__doc__ = _PLACEHOLDER.sub(lambda match: _FRAGMENTS[match.group(1)], function.__doc__)
    return function
