"""Sphinx configuration of the irpe_jax docs (scripts/docs.sh builds them)."""

import os
import sys

sys.path.insert(0, os.path.abspath('..'))

import irpe_jax  # pylint: disable=wrong-import-position  # noqa: E402

project = 'irpe_jax'
author = 'the irpe_jax authors'
copyright = 'the irpe_jax authors, MIT licence'  # noqa: A001
release = version = irpe_jax.__version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build']
myst_heading_anchors = 4
myst_enable_extensions = ['dollarmath']

# Docstrings write code in single backticks, as Markdown does.
default_role = 'literal'

autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Dataclass fields listed under `Attributes:` are fields of the class's
# entry, not entries of their own beside autodoc's.
napoleon_use_ivar = True

html_theme = 'alabaster'
html_title = f'irpe_jax {release}'
