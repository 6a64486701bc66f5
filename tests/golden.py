"""Loading of the golden vectors made by the original PyTorch release.

They live in `tests/golden/` (see its README for what each file holds).
"""

import functools
import json
import pathlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / 'golden'


@functools.lru_cache(maxsize=None)
def arrays(name: str) -> dict:
  """All arrays of `golden/NAME.npz`, read once (and the file closed)."""
  with np.load(GOLDEN_DIR / f'{name}.npz') as npz:
    return dict(npz)


def cases(name: str):
  """`(case, arrays)` pairs of `golden/NAME.json` and `NAME.npz`."""
  index = json.loads((GOLDEN_DIR / f'{name}.json').read_text())
  return [(c, _Case(arrays(name), c['key'])) for c in index]


class _Case:
  """Arrays of one case: `case['x']` reads `KEY/x` lazily."""

  def __init__(self, arrays, key):
    self._arrays, self._key = arrays, key

  def __getitem__(self, name):
    return self._arrays[f'{self._key}/{name}']


def nest(flat):
  """`{'a.b': v}` -> `{'a': {'b': v}}`."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split('.')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree, prefix=''):
  """Inverse of `nest`."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def assert_close(actual, expected, rtol, name=''):
  """Max abs error relative to the largest magnitude of `expected`."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  err = float(np.max(np.abs(actual - expected))) / scale
  assert err <= rtol, f'{name}: relative error {err:.3g} > {rtol}'
