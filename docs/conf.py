# Sphinx configuration of the histo2expr documentation.
# Built in CI with warnings as errors: sphinx-build -W --keep-going -b html docs docs/_build/html
from __future__ import annotations

import builtins
import os
import sys
import urllib.request
from datetime import datetime
from importlib.metadata import metadata

from sphinx.ext.intersphinx import missing_reference
from sphinx.pycode import ModuleAnalyzer

# -- Project information ---------------------------------------------------------------------------

info = metadata("histo2expr")
project = info["Name"]
author = info["Author"]
copyright = f"{datetime.now():%Y}, {author}"
version = release = info["Version"]

# -- General configuration -------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinxcontrib.bibtex",
]

source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
nitpicky = True  # every cross-reference must resolve
needs_sphinx = "7.0"
default_role = "literal"

# Tutorials are stored with their outputs; the docs build never executes them.
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "show"  # warnings and progress bars, as a reader running the notebook sees them
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_member_order = "groupwise"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
# Returns sections are free text (the type comes from the annotation), often "Sets the following
# fields:" and a definition list of AnnData fields, as in scanpy: rendered as written under a
# "Returns" heading, instead of napoleon's reading of every unindented line as a type.
napoleon_custom_sections = ["Returns"]


bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "label"

# -- Intersphinx -----------------------------------------------------------------------------------

intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
}
# Top-level modules whose objects the inventories above document.
EXTERNAL_MODULES = frozenset(sys.stdlib_module_names) | {
    key for key in intersphinx_mapping if key != "python"
}


def _inventories_reachable(timeout: float = 5.0) -> bool:
    """Whether the intersphinx inventories can be fetched (False offline or when told so)."""
    if os.environ.get("HISTO2EXPR_DOCS_OFFLINE", "") not in ("", "0"):
        return False
    request = urllib.request.Request("https://docs.python.org/3/objects.inv", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except OSError:
        return False


# Offline, the inventories cannot be fetched (a fetch failure is a warning that -W turns into an
# error). Then references to the external packages above render as plain text and are listed at the
# end of the build; references to histo2expr itself are still checked. Online (ReadTheDocs, CI),
# every reference must resolve.
OFFLINE = not _inventories_reachable()
if OFFLINE:
    intersphinx_mapping = {}

_unchecked: set[str] = set()


def _public_candidates(target: str) -> list[str]:
    """Shorter names under which ``target`` may be documented, longest first.

    Type hints name the module an object is defined in, documentation the namespace that exports it:
    ``histo2expr.io._slides.SlideImage`` -> ``histo2expr.io.SlideImage``, ``anndata._core.anndata.AnnData``
    -> ``anndata.AnnData``, ``pandas.core.series.Series`` -> ``pandas.core.Series``, ``pandas.Series``.
    """
    *modules, name = target.split(".")
    public = []
    for part in modules:
        if part.startswith("_"):
            break
        public.append(part)
    longest = len(public) if len(public) < len(modules) else len(public) - 1
    return [".".join([*public[:end], name]) for end in range(longest, 0, -1)]


def _resolve_missing(app, env, node, contnode):
    """Resolve a type hint's defining-module name under its public name; offline, externals as text."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    internal = target.split(".")[0] == "histo2expr"
    if not internal and OFFLINE:
        # Builtins are named without their module (``Ellipsis`` in ``tuple[float, ...]``).
        if target.split(".")[0] in EXTERNAL_MODULES or hasattr(builtins, target):
            _unchecked.add(target)
            return contnode
        return None
    for candidate in _public_candidates(target):
        attempt = node.deepcopy()
        attempt["reftarget"] = candidate
        if internal:
            resolved = env.get_domain("py").resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], candidate, attempt, contnode
            )
        else:
            resolved = missing_reference(app, env, attempt, contnode)
        if resolved is not None:
            return resolved
    name = target.rsplit(".", 1)[-1]
    if internal and name.startswith("_") and not name.startswith("__"):
        # A type hint naming a private class (a method's ``-> _STNetNetwork``): it has no page to
        # link to, so it is shown as text.
        return contnode
    return None


def _doc_comment_of_reexported_data(app, what, name, obj, options, lines):
    """Document data that a namespace re-exports with the ``#:`` comment where it is defined.

    Autodoc looks for the comment in the namespace (``histo2expr.models``), finds none there and
    falls back to the docstring of the value's type (``dict``'s for ``BUILTIN_ENCODERS``).
    """
    if what != "data" or not name.startswith("histo2expr."):
        return
    namespace, _, attribute = name.rpartition(".")
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith(f"{namespace}.") and vars(module).get(attribute) is obj:
            comment = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", attribute))
            if comment:
                lines[:] = comment
                return


def _report_unchecked(app, exception):
    if OFFLINE and exception is None:
        from sphinx.util import logging

        logging.getLogger(__name__).info(
            "offline build: %d references to external packages were not checked: %s",
            len(_unchecked),
            ", ".join(sorted(_unchecked)),
        )


def setup(app):
    app.connect("autodoc-process-docstring", _doc_comment_of_reexported_data)
    app.connect("missing-reference", _resolve_missing)
    app.connect("build-finished", _report_unchecked)


# -- HTML output -----------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = project
html_theme_options = {
    "repository_url": "https://github.com/histo2expr/histo2expr",
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}
pygments_style = "default"
