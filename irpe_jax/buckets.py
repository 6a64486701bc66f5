"""Bucket ids of 2D relative positions: the piecewise index and the methods.

Everything here is plain numpy evaluated at trace time. Bucket tables depend
only on static shapes and hyper-parameters, so they are computed once per
(method, shape, skip, alpha, beta, gamma) and cached; a jitted model sees them
as constants and traces once per input shape.

The arithmetic follows the original PyTorch release bit for bit: float32
throughout, round-half-to-even, truncation toward zero when converting to int.
"""

import functools
from typing import Callable, Tuple

import numpy as np

# Canonical method names, and the aliases users of the release know.
EUCLIDEAN = 'euc'
QUANT = 'quant'
CROSS = 'cross'
PRODUCT = 'product'
CROSS_ROWS = 'cross_rows'
CROSS_COLS = 'cross_cols'

_METHOD_ALIASES = {
    'euc': EUCLIDEAN, 'euclidean': EUCLIDEAN,
    'quant': QUANT, 'quantization': QUANT,
    'cross': CROSS,
    'product': PRODUCT,
    'cross_rows': CROSS_ROWS,
    'cross_cols': CROSS_COLS,
}
# Methods that give one bucket table (cross is a pair of tables).
TABLE_METHODS = (EUCLIDEAN, QUANT, PRODUCT, CROSS_ROWS, CROSS_COLS)


def canonical_method(method: str) -> str:
  """Maps a method name or alias to its canonical short name."""
  if not isinstance(method, str):
    raise TypeError(f'method must be a string, got {method!r} '
                    f'({type(method).__name__}).')
  name = _METHOD_ALIASES.get(method.lower())
  if name is None:
    raise ValueError(f'Unknown method {method!r}; expected one of '
                     f'{sorted(_METHOD_ALIASES)}.')
  return name


def piecewise_index(relative_position: np.ndarray, alpha: float, beta: float,
                    gamma: float) -> np.ndarray:
  """The piecewise index function g of the paper (Eq. 18), as released.

  Exact inside `[-alpha, alpha]`, logarithmic outside, saturating at
  `int(beta)`.

  Args:
    relative_position: integer or float array of relative positions.
    alpha: half-width of the exact region.
    beta: saturation value (truncated to an integer).
    gamma: controls the slope of the logarithmic part.

  Returns:
    An int32 array of the same shape, with values in
    `[-int(beta), int(beta)]`.
  """
  rp = np.asarray(relative_position)
  is_float = np.issubdtype(rp.dtype, np.floating)
  rp_f = rp.astype(np.float32)
  rp_abs = np.abs(rp_f)
  inside = rp_abs <= np.float32(alpha)
  alpha32, beta32 = np.float32(alpha), np.float32(beta)
  # The release computes math.log in float64 and the rest in float32.
  log_ratio = np.float32(np.log(gamma / alpha))
  safe_abs = np.where(inside, alpha32, rp_abs)  # log(0) never evaluated.
  outside = alpha32 + np.log(safe_abs / alpha32) / log_ratio * (
      np.float32(beta - alpha))
  outside = np.sign(rp_f) * np.minimum(np.round(outside), beta32)
  outside = np.trunc(outside)
  inside_vals = np.round(rp_f) if is_float else rp_f
  return np.where(inside, inside_vals, outside).astype(np.int32)


def clip_index(relative_position: np.ndarray, alpha: float, beta: float,
               gamma: float) -> np.ndarray:
  """The clip index function `max(-beta, min(beta, x))` (paper Table 3).

  Takes the same arguments as `piecewise_index` (alpha and gamma unused) so
  the two are interchangeable; the result lies in `[-int(beta), int(beta)]`.
  """
  del alpha, gamma
  rp = np.round(np.asarray(relative_position, dtype=np.float32))
  beta_int = int(beta)
  return np.clip(rp, -beta_int, beta_int).astype(np.int32)


def num_buckets_without_skip(method: str, beta: float) -> int:
  """Number of buckets of one table of `method`, before the skip bucket."""
  method = canonical_method(method)
  side = 2 * int(beta) + 1
  return side * side if method == PRODUCT else side


_IndexFn = Callable[[np.ndarray, float, float, float], np.ndarray]
_INDEX_FUNCTIONS = {'piecewise': piecewise_index, 'clip': clip_index}


def _bucket_ids_without_skip(method, height, width, alpha, beta, gamma,
                             index_fn: _IndexFn):
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  pos = np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.int64)
  diff = pos[:, None, :] - pos[None, :, :]  # (L, L, 2): query minus key.
  beta_int = int(beta)
  g = functools.partial(index_fn, alpha=alpha, beta=beta, gamma=gamma)
  if method == EUCLIDEAN:
    dist = np.round(np.sqrt((diff ** 2).sum(-1).astype(np.float32)))
    return g(dist) + beta_int
  if method == QUANT:
    return g((diff ** 2).sum(-1)) + beta_int
  if method == PRODUCT:
    side = 2 * beta_int + 1
    return (g(diff[..., 0]) + beta_int) * side + g(diff[..., 1]) + beta_int
  if method == CROSS_ROWS:
    return g(diff[..., 0]) + beta_int
  if method == CROSS_COLS:
    return g(diff[..., 1]) + beta_int
  raise ValueError(
      f"method {method!r} has no single bucket table; 'cross' is the pair "
      f"('cross_rows', 'cross_cols').")


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {value!r}.')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}.')


def get_bucket_ids_2d(method: str, height: int, width: int, skip: int,
                      alpha: float, beta: float, gamma: float,
                      index_fn: str = 'piecewise') -> Tuple[np.ndarray, int]:
  """Bucket ids of every (query, key) pair of a `height x width` token grid.

  Args:
    method: 'euc', 'quant', 'product', 'cross_rows' or 'cross_cols'
      ('euclidean' and 'quantization' are accepted too).
    height: rows of the token grid.
    width: columns of the token grid.
    skip: number of leading non-spatial tokens (class token, ...).
    alpha: piecewise index parameter (`ratio`).
    beta: piecewise index parameter (`2 * ratio`).
    gamma: piecewise index parameter (`8 * ratio`).
    index_fn: 'piecewise' (the paper's g) or 'clip'.

  Returns:
    `(bucket_ids, num_buckets)`: a read-only int32 array
    `(skip + height * width, skip + height * width)` and the bucket count,
    including the extra bucket shared by all pairs that touch a skip token.
  """
  method = canonical_method(method)
  _check_int('height', height, 1)
  _check_int('width', width, 1)
  _check_int('skip', skip, 0)
  if not alpha > 0:
    raise ValueError(f'alpha must be > 0, got {alpha}.')
  if index_fn not in _INDEX_FUNCTIONS:
    raise ValueError(f'Unknown index_fn {index_fn!r}; expected one of '
                     f'{sorted(_INDEX_FUNCTIONS)}.')
  return _cached_bucket_ids(method, int(height), int(width), int(skip),
                            float(alpha), float(beta), float(gamma), index_fn)


@functools.lru_cache(maxsize=256)
def _cached_bucket_ids(method, height, width, skip, alpha, beta, gamma,
                       index_fn):
  ids = _bucket_ids_without_skip(method, height, width, alpha, beta, gamma,
                                 _INDEX_FUNCTIONS[index_fn])
  num_buckets = num_buckets_without_skip(method, beta)
  if skip > 0:
    ids = np.pad(ids, ((skip, 0), (skip, 0)), constant_values=num_buckets)
    num_buckets += 1
  ids = np.ascontiguousarray(ids, dtype=np.int32)
  ids.setflags(write=False)  # Shared by every caller through the cache.
  return ids, num_buckets
