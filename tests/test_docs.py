"""The documentation cannot fall behind the code: the API page lists exactly the public names of every
namespace, and the command-line page every option of the command."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import histo2expr as hx
from histo2expr import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


def api_page_entries(text: str) -> dict[str, list[str]]:
    """Names in the autosummary tables of the API page, by the namespace of the automodule above them."""
    entries: dict[str, list[str]] = {}
    namespace = None
    in_table = False
    for line in text.splitlines():
        if match := re.fullmatch(r"\.\. automodule:: histo2expr\.(\w+)", line.strip()):
            namespace = match.group(1)
            entries.setdefault(namespace, [])
        elif line.strip() == ".. autosummary::":
            assert namespace is not None, "an autosummary table on docs/api.md comes before any automodule"
            in_table = True
        elif in_table and line.strip().startswith("```"):
            in_table = False
        elif in_table and (match := re.fullmatch(r"\s+([A-Za-z_]\w*)\s*", line)):
            entries[namespace].append(match.group(1))
    return entries


@pytest.fixture(scope="module")
def api_entries() -> dict[str, list[str]]:
    return api_page_entries((DOCS / "api.md").read_text(encoding="utf-8"))


def test_parser_reads_tables_by_namespace() -> None:
    text = (
        "```{eval-rst}\n.. automodule:: histo2expr.pp\n\n.. autosummary::\n    :toctree: generated\n\n"
        "    normalize\n    select_genes\n```\n\nprose mentioning\n    not_an_entry\n"
        "```{eval-rst}\n.. automodule:: histo2expr.io\n\n.. autosummary::\n\n    read_visium\n```\n"
    )
    assert api_page_entries(text) == {"pp": ["normalize", "select_genes"], "io": ["read_visium"]}


def test_api_page_has_a_section_per_namespace(api_entries: dict[str, list[str]]) -> None:
    assert set(hx.__all__) >= {"datasets", "io", "metrics", "patches", "pp", "splits"}
    assert sorted(api_entries) == sorted(hx.__all__), (
        "docs/api.md needs one automodule section per name in hx.__all__"
    )


@pytest.mark.parametrize("namespace", hx.__all__)
def test_api_page_lists_exactly_the_public_names(namespace: str, api_entries: dict[str, list[str]]) -> None:
    module = importlib.import_module(f"histo2expr.{namespace}")
    public = getattr(module, "__all__", None)
    assert public is not None, f"histo2expr.{namespace} has no __all__; list its public names there"
    assert all(hasattr(module, name) for name in public), (
        f"histo2expr.{namespace}.__all__ names a missing object"
    )
    listed = api_entries.get(namespace, [])
    assert len(listed) == len(set(listed)), f"docs/api.md lists a name of histo2expr.{namespace} twice"
    missing = sorted(set(public) - set(listed))
    unknown = sorted(set(listed) - set(public))
    assert not missing, f"add these to the `{namespace}` section of docs/api.md: {missing}"
    assert not unknown, (
        f"docs/api.md lists names that histo2expr.{namespace}.__all__ does not have: {unknown}"
    )


def _options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit):
        cli.main(argv)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out)) - {"--help"}


def test_cli_page_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    options = _options(["--help"], capsys) | _options(["demo", "--help"], capsys)
    options |= _options(["benchmark", "--help"], capsys)
    assert "--seed" in options
    missing = sorted(option for option in options if not re.search(rf"(?<![\w-]){option}(?![\w-])", page))
    assert not missing, f"docs/cli.md does not describe these options of `histo2expr`: {missing}"


def test_docs_and_docstrings_name_no_file_outside_the_repository():
    """Design notes kept outside the repository (DESIGN.md, METHODS.md) are not there for readers."""
    root = DOCS.parent
    texts = [*root.glob("src/histo2expr/**/*.py"), *DOCS.glob("**/*.md"), root / "README.md"]
    cited = [
        f"{path.relative_to(root)}: {name}"
        for path in texts
        if "_build" not in path.parts
        for name in ("DESIGN.md", "METHODS.md")
        if name in path.read_text(encoding="utf-8")
    ]
    assert not cited


def test_shared_docstring_fragments_are_filled_in():
    from histo2expr import _docs

    placeholders = [f"{{{name}}}" for name in _docs._FRAGMENTS]
    for namespace in ("io", "pp", "patches", "tl", "get", "pl", "splits", "metrics"):
        module = importlib.import_module(f"histo2expr.{namespace}")
        for name in module.__all__:
            doc = getattr(module, name).__doc__ or ""
            assert not [p for p in placeholders if p in doc], f"hx.{namespace}.{name}"
    assert "scanpy.settings.figdir" in hx.pl.heg_curve.__doc__  # filled with the fragment
