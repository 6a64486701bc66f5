"""Loading of the golden vectors made by the original PyTorch release.

They live in `tests/golden/` (see its README for what each file holds).
"""

import functools
import json
import pathlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / 'golden'
