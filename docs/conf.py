"""Sphinx configuration for the trio_taskworker docs."""

from __future__ import annotations

import trio_taskworker

project = "trio_taskworker"
author = "the trio_taskworker developers"
release = version = trio_taskworker.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
intersphinx_mapping: dict[str, tuple[str, None]] = {}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
html_theme = "alabaster"
exclude_patterns = ["_build"]
