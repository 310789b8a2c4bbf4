"""The tutorials cannot rot: the quick start is executed on the CPU, as a reader would run it.

The notebooks in docs/notebooks are stored with their outputs (Read the Docs does not execute
them). Run this module as a script to re-execute notebooks in place, as docs/contributing.md
describes:

    python tests/test_notebooks.py docs/notebooks/quickstart.ipynb
"""

from __future__ import annotations

import base64
import re
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "docs" / "notebooks"
STATIC = ROOT / "docs" / "_static"
#: A cell tagged ``docs-figure:NAME`` has its first PNG output written to docs/_static/NAME.png.
FIGURE_TAG = "docs-figure:"
#: Seconds a single cell may run (the quick start's longest cell embeds the patches).
CELL_TIMEOUT = 1800


def execute(notebook, *, workdir: Path):
    """Run every cell of ``notebook`` (an nbformat node, changed in place) in ``workdir``.

    The kernel is ``python3`` of the running interpreter. A cell that raises stops the run with
    :class:`nbclient.exceptions.CellExecutionError`.
    """
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return notebook


#: A warning as Python prints it: ``path:line: Category: message``, then the source line, indented.
_WARNING_LINE = re.compile(r"^\S.*?:\d+: (\w*Warning: .*)$")


def readable_stderr(text: str) -> str:
    """stderr as a reader of the notebook saw it, without what names files of the machine that ran it.

    Carriage returns overwrite a line, as a terminal or Jupyter shows them (a progress bar keeps its
    last state); a warning keeps its category and message, without the file and line it was raised
    from and the source line below it.
    """
    lines = []
    skip_source = False
    for line in text.split("\n"):
        line = line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
        if skip_source and line.startswith("  "):
            skip_source = False
            continue
        skip_source = False
        if match := _WARNING_LINE.match(line):
            line, skip_source = match.group(1), True
        lines.append(line)
    return "\n".join(lines)


def strip_noise(notebook) -> None:
    """Drop what changes on every run without telling the reader anything: execution metadata, widget state.

    stderr stays (progress bars and warnings are what a reader of the notebook sees), made readable
    by :func:`readable_stderr`; consecutive stderr outputs of a cell are merged into one.
    """
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                if outputs and outputs[-1].output_type == "stream" and outputs[-1].name == "stderr":
                    outputs[-1].text += output.text
                    continue
            outputs.append(output)
        for output in outputs:
            if output.output_type == "stream" and output.name == "stderr":
                output.text = readable_stderr(output.text)
        cell.outputs = outputs


def shrink_images(notebook) -> None:
    """Re-encode PNG outputs with a 256-colour palette where that is smaller (H&E backgrounds are large)."""
    from io import BytesIO

    from PIL import Image

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "image/png" not in output.get("data", {}):
                continue
            original = base64.b64decode(output.data["image/png"])
            image = Image.open(BytesIO(original)).convert("RGB")
            buffer = BytesIO()
            image.quantize(colors=256, dither=Image.Dither.NONE).save(buffer, "PNG", optimize=True)
            if buffer.tell() < len(original):
                output.data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")


def figures(notebook) -> dict[str, bytes]:
    """The first PNG of every cell tagged ``docs-figure:NAME``, by NAME."""
    found = {}
    for cell in notebook.cells:
        for tag in cell.metadata.get("tags", []):
            if tag.startswith(FIGURE_TAG):
                pngs = [
                    o.data["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
                ]
                assert pngs, f"the cell tagged {tag!r} made no PNG"
                found[tag.removeprefix(FIGURE_TAG)] = base64.b64decode(pngs[0])
    return found


def reexecute(path: Path) -> None:
    """Execute the notebook at ``path`` in a scratch folder and store its outputs and figures."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as workdir:
        execute(notebook, workdir=Path(workdir))
    strip_noise(notebook)
    shrink_images(notebook)
    nbformat.write(notebook, path)
    for name, png in figures(notebook).items():
        (STATIC / f"{name}.png").write_bytes(png)


def _output_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
            parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def test_a_failing_cell_fails_the_run(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('rotten')")]
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="rotten"):
        execute(notebook, workdir=tmp_path)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_stored_notebooks_have_outputs_and_no_local_paths(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code), f"{path.name} is stored unexecuted"
    assert not any(o.output_type == "error" for cell in code for o in cell.outputs), (
        f"{path.name} stores an error"
    )
    text = _output_text(notebook)
    for local in {str(ROOT), str(ROOT.parent / "shared"), str(Path.home())} - {"/"}:
        assert local not in text, (
            f"{path.name} shows the local path {local}; re-execute it without printing it"
        )


def test_readable_stderr_keeps_what_a_reader_sees():
    raw = (
        "fit ridge:   0%|          | 0/5 [00:00<?, ?it/s]\rfit ridge: 100%|##########| 5/5 [00:01<00:00]\n"
        "/tmp/ipykernel_123/456.py:1: UserWarning: 2 of 4 folds hold out slides that share their patient\n"
        "  model = hx.tl.fit_histo2expr(adata)\n"
    )
    assert readable_stderr(raw) == (
        "fit ridge: 100%|##########| 5/5 [00:01<00:00]\nUserWarning: 2 of 4 folds hold out slides that share their patient\n"
    )


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_stored_notebooks_show_no_progress_warning(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    assert "TqdmWarning" not in _output_text(notebook) and "IProgress" not in _output_text(notebook)


def test_quickstart_runs_on_the_cpu(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    execute(notebook, workdir=tmp_path)
    assert (tmp_path / "chrep_synthetic.pt").is_file(), "the quick start no longer saves its model"
    assert "quickstart_spatial" in figures(notebook)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python {sys.argv[0]} NOTEBOOK.ipynb [...]")
    for argument in sys.argv[1:]:
        print(f"executing {argument}")
        reexecute(Path(argument))
