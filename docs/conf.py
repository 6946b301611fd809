"""Sphinx configuration: ``bash scripts/docs.sh`` builds docs/ into docs/_build/html.

The build is strict (``-W --keep-going -n``): a warning, a broken cross-reference, a
public name without a docstring or a dead internal link fails it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import distruntime  # noqa: E402  (after the path: the installed, editable package)

project = "distruntime"
author = "distruntime contributors"
copyright = "distruntime contributors"
release = version = distruntime.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "distruntime_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# MyST: GitHub-style heading anchors so the pages' `page.md#section` links resolve (and are
# checked); fenced blocks keep their first info-string word as the language.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# API reference from the code. Signatures keep the types; the description gets the prose.
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # fields as a list: no duplicate entries with autodoc's
napoleon_attr_annotations = True

# Every cross-reference must resolve. Without network access there is no intersphinx, so
# names outside this package (the standard library, torch, pytest) are not link targets:
# they are accepted here. Names inside distruntime are never ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|pytest|_pytest|typing|typing_extensions|collections|os|datetime|pathlib|"
               r"types|argparse|logging|enum|dataclasses|threading|signal|subprocess|contextlib)"
               r"(\..*)?"),
    (r"py:.*", r"(Any|Callable|Iterator|Generator|Mapping|Sequence|Self|Literal|TypeVar|"
               r"DeviceMesh|Store|ProcessGroup|Path|timedelta|NoneType|ellipsis|T|F|P|R)"),
    (r"py:class", r"(RuntimeError|ValueError|SystemExit|Exception|BaseException|object|int|str|"
                  r"float|bool|bytes|dict|list|tuple|set|frozenset|type|None)"),
]

html_theme = "furo"
html_title = f"distruntime {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
pygments_style = "friendly"
