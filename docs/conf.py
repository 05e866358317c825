"""Sphinx configuration for the combinators documentation.

Build with ``make docs`` (HTML in ``docs/_build/html``). The build is offline
and strict: the Makefile passes ``-n -W --keep-going``, so a broken
cross-reference or any other warning fails it. The tutorials are rendered
from their committed outputs; nothing is executed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

# Importing combinators starts JAX; keep it on the CPU and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import combinators  # noqa: E402

project = "combinators"
author = "the combinators authors"
copyright = "the combinators authors"  # noqa: A001
version = release = combinators.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_design",
    "myst_nb",
    "combinators_docs",
]

exclude_patterns = ["_build", "snippets", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme = "furo"
html_title = f"combinators {release}"

# --- the tutorials: copies of tutorials/*.ipynb, rendered, never executed ---
# Sphinx reads sources only below docs/, so every notebook in tutorials/ (a
# glob: new tutorials appear without editing this file) is copied to
# docs/tutorials/ (git-ignored), keeping the file's time stamp so that an
# unchanged notebook is not read again by an incremental build.
TUTORIALS = DOCS / "tutorials"


def _copy_tutorials() -> None:
    TUTORIALS.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "tutorials").glob("*.ipynb"))}
    for stale in TUTORIALS.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        target = TUTORIALS / name
        if not target.exists() or target.stat().st_mtime != source.stat().st_mtime:
            shutil.copy2(source, target)


_copy_tutorials()

nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# --- autodoc -----------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
python_use_unqualified_type_names = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become attribute entries (link targets); autodoc
# skips the undocumented dataclass fields and NamedTuple fields they describe.
napoleon_use_ivar = False
napoleon_custom_sections = [("References", "notes_style")]

# --- cross-references ----------------------------------------------------------
# Every reference inside the package must resolve (-n -W). The build is
# offline, so the inventories of Python, JAX, NumPyro, Optax, Flax and the
# other dependencies are not available; references to their objects (type
# annotations such as jax.Array or numpyro.distributions.Distribution) are
# left as text instead of links. The patterns below name only external
# packages, so a broken reference to a combinators object still fails.
_EXTERNAL = (
    "jax",
    "jaxlib",
    "numpyro",
    "dist",  # numpyro.distributions, as the package imports it
    "optax",
    "flax",
    "numpy",
    "np",
    "jnp",
    "matplotlib",
    "arviz",
    "blackjax",
    "collections",
    "os",
    "pathlib",
    "types",
    "numbers",
    "dataclasses",
    "functools",
    "contextlib",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
]
# combinators.amortized annotates parameters with a private alias for "any
# pytree" (Params = Any), which has no page.
nitpick_ignore = [("py:class", "Params")]
