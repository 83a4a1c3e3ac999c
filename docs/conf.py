"""Sphinx configuration of the mnist-jax manual (MyST Markdown pages, autodoc API pages).

Build it offline and strictly (every warning an error)::

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -b html docs docs/_build/html

The command line and API reference pages are generated while building, from
``mnist_jax.cli.build_parser()`` and ``mnist_jax.__all__`` (``_ext/mnist_jax_docs.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # this checkout's mnist_jax, also without an install

import mnist_jax  # noqa: E402

project = "mnist-jax"
author = "the mnist-jax authors"
copyright = author
release = version = mnist_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "mnist_jax_docs",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# The API pages show signatures as a user calls them; the docstrings are reST.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}

html_theme = "furo"
html_title = f"mnist-jax {release}"
# Offline by design: no intersphinx, no external assets.
