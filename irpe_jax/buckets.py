"""Bucket ids of 2D relative positions: the index functions, the methods and
the structure of the ids over the token grid.

Everything here is plain numpy evaluated at trace time. Bucket tables depend
only on static shapes and hyper-parameters, so they are computed once per
(method, shape, skip, alpha, beta, gamma, index_fn) and cached; a jitted
model sees them as constants and traces once per input shape.

A geometry itself is small (an offset table of about `4 L` entries,
classes of `2 (h + w)`); its full `(L, L)` ids are built only when asked
for, and only up to `MAX_IDS_BYTES` (see `check_grid_bytes`).

The arithmetic follows the original PyTorch release bit for bit: float32
throughout, round-half-to-even, truncation toward zero when converting to int.
"""

import dataclasses
import functools
import numbers
import os
import threading
from typing import Callable, Tuple, Union

import numpy as np

from irpe_jax import _checks

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
# The release's integer METHOD ids (`irpe.METHOD`).
_METHOD_IDS = {0: EUCLIDEAN, 1: QUANT, 3: PRODUCT, 4: CROSS, 41: CROSS_ROWS,
               42: CROSS_COLS}
# Methods that give one bucket table (cross is a pair of tables).
TABLE_METHODS = (EUCLIDEAN, QUANT, PRODUCT, CROSS_ROWS, CROSS_COLS)


def canonical_method(method: Union[str, int]) -> str:
  """Maps a method name, alias or release METHOD id to its canonical name.

  Args:
    method: a name ('euc', 'quant', 'cross', 'product', 'cross_rows',
      'cross_cols'), an alias ('euclidean', 'quantization'), any of them in
      any case, or one of the release's integer ids (0 euc, 1 quant,
      3 product, 4 cross, 41 cross_rows, 42 cross_cols).

  Returns:
    The canonical short name.
  """
  if isinstance(method, (numbers.Integral, np.integer)) and not isinstance(
      method, (bool, np.bool_)):
    name = _METHOD_IDS.get(int(method))
    if name is None:
      raise ValueError(f'Unknown method id {method}; expected one of '
                       f'{sorted(_METHOD_IDS)}.')
    return name
  if not isinstance(method, str):
    raise TypeError(f'method must be a string or a release METHOD id, got '
                    f'{method!r} ({type(method).__name__}).')
  name = _METHOD_ALIASES.get(method.lower())
  if name is None:
    raise ValueError(f'Unknown method {method!r}; expected one of '
                     f'{sorted(_METHOD_ALIASES)}.')
  return name


def _check_index_params(alpha, beta, gamma, index_fn: str):
  """`(alpha, beta, gamma)` as floats, checked so every id is in range.

  `beta >= alpha` keeps the exact region `[-alpha, alpha]` inside the
  `2 * int(beta) + 1` buckets, and `gamma > alpha` keeps the logarithmic
  part increasing (the release always has `beta = 2 alpha`,
  `gamma = 8 alpha`). The clip index ignores alpha and gamma.
  """
  alpha = _checks.check_number('alpha', alpha, minimum=0.0,
                               exclusive_minimum=True)
  beta = _checks.check_number('beta', beta, minimum=alpha)
  if index_fn == 'piecewise':
    gamma = _checks.check_number('gamma', gamma, minimum=alpha,
                                 exclusive_minimum=True)
  else:
    gamma = _checks.check_number('gamma', gamma)
  return alpha, beta, gamma


def piecewise_index(relative_position: np.ndarray, alpha: float, beta: float,
                    gamma: float) -> np.ndarray:
  """The piecewise index function g of the paper (Eq. 18), as released.

  Exact inside `[-alpha, alpha]`, logarithmic outside, saturating at
  `int(beta)`.

  Args:
    relative_position: integer or float array of relative positions.
    alpha: half-width of the exact region, `> 0`.
    beta: saturation value (truncated to an integer), `>= alpha`.
    gamma: controls the slope of the logarithmic part, `> alpha`.

  Returns:
    An int32 array of the same shape, with values in
    `[-int(beta), int(beta)]` for integer inputs.
  """
  alpha, beta, gamma = _check_index_params(alpha, beta, gamma, 'piecewise')
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
  beta = _checks.check_number('beta', beta, minimum=0.0)
  rp = np.round(np.asarray(relative_position, dtype=np.float32))
  beta_int = int(beta)
  return np.clip(rp, -beta_int, beta_int).astype(np.int32)


def num_buckets_without_skip(method: Union[str, int], beta: float) -> int:
  """Number of buckets of one table of `method`, before the skip bucket."""
  method = canonical_method(method)
  side = 2 * int(_checks.check_number('beta', beta, minimum=0.0)) + 1
  return side * side if method == PRODUCT else side


_IndexFn = Callable[[np.ndarray, float, float, float], np.ndarray]
_INDEX_FUNCTIONS = {'piecewise': piecewise_index, 'clip': clip_index}
_MAX_BUCKETS = np.iinfo(np.int32).max

# Most bytes of one int32 array built for a token grid: the (L, L) ids, the
# (2h - 1, 2w - 1) offset table or the (h + w, L) classes of the factored
# scatter. 2 GiB holds the ids of L = 23170 tokens: a 128 x 128 grid with
# its class and distillation tokens (L = 16386, 1 GiB) and the dense
# attention it needs (a 1 GiB float32 (L, L) per head and image) fit, with
# room. Tracing a lookup holds two or three arrays of that size on the host
# (the ids, the gather's flat index, its device copy; 2 GiB more peak memory
# and 3 s on CPU for a 128 x 128 grid), up to 6 GiB at the limit; a
# 200 x 200 grid would need 6.4 GB for its ids alone.
# Read at each check, so assigning it takes effect; the environment
# variable IRPE_JAX_MAX_IDS_BYTES, when set, takes precedence.
MAX_IDS_BYTES = 2 ** 31
MAX_IDS_BYTES_ENV = 'IRPE_JAX_MAX_IDS_BYTES'


def max_ids_bytes() -> int:
  """The limit in bytes: `$IRPE_JAX_MAX_IDS_BYTES`, else `MAX_IDS_BYTES`."""
  text = os.environ.get(MAX_IDS_BYTES_ENV)
  if text is None:
    return _checks.check_int('irpe_jax.buckets.MAX_IDS_BYTES', MAX_IDS_BYTES,
                             1)
  try:
    value = int(text.strip())
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f'{MAX_IDS_BYTES_ENV}={text!r}: expected a whole number '
                     f'of bytes >= 1, e.g. {MAX_IDS_BYTES}.')
  return value


def _gib(num_bytes: int) -> str:
  return f'{num_bytes / 2 ** 30:.3g} GiB'


def check_grid_bytes(what: str, shape: Tuple[int, ...], height: int,
                     width: int, skip: int) -> int:
  """Raises before an int32 array of `shape` larger than the limit is built.

  The limit is `max_ids_bytes()`: the environment variable
  `IRPE_JAX_MAX_IDS_BYTES` if set, else `MAX_IDS_BYTES` (2 GiB: the `(L, L)`
  ids of up to 23170 tokens, e.g. a 152 x 152 grid with a class token).

  Args:
    what: the array, as the message names it, e.g. '(L, L) bucket ids'.
    shape: its shape.
    height: rows of the token grid it is built for.
    width: columns of the token grid.
    skip: leading non-spatial tokens.

  Returns:
    The array's size in bytes.
  """
  num_bytes = 4 * int(np.prod(shape, dtype=object))
  limit = max_ids_bytes()
  if num_bytes > limit:
    length = skip + height * width
    raise ValueError(
        f'The {what} of a height={height} x width={width} token grid with '
        f'skip={skip} (L={length} tokens) would be an int32 array of shape '
        f'{tuple(shape)}, {num_bytes} bytes ({_gib(num_bytes)}), over the '
        f'limit of {limit} bytes ({_gib(limit)}); use a smaller grid, or '
        f'raise the limit with the environment variable '
        f'{MAX_IDS_BYTES_ENV} (or irpe_jax.buckets.MAX_IDS_BYTES).')
  return num_bytes


@dataclasses.dataclass(frozen=True, eq=False)
class BucketGeometry:
  """The bucket ids of one table over a token grid, and their structure.

  Token `i` of the `L = skip + height * width` tokens is spatial when
  `i >= skip`, at row `ri = (i - skip) // width` and column
  `ci = (i - skip) % width`. The bucket of a spatial pair depends only on
  the offset `(dr, dc) = (ri - rj, ci - cj)` (the 2D relative position of
  Wu et al., ICCV 2021, Sec. 3.2), and splits into a row part and a column
  part:

      ids[i, j] = pair_buckets[row_class[dr + height - 1],
                               col_class[dc + width - 1]],

  where row offsets share a class when they give the same bucket for every
  column offset, and likewise for columns. 'product' has one class per
  distinct `g(dr)` and per `g(dc)`, each class pair its own bucket;
  'cross_rows' has one column class, 'cross_cols' one row class; 'euc' and
  'quant' group `|dr|` and `|dc|` (far offsets, which saturate, share a
  class), and several class pairs share a bucket. Every pair that touches
  one of the `skip` leading tokens falls in the last bucket,
  `num_buckets - 1`.

  Instances are cached per argument tuple, read-only, and hashable (by
  their arguments), so they can be static arguments of jitted functions.
  The structure is small; the full `ids` are built on first access (and
  kept), and raise there if they would exceed `MAX_IDS_BYTES` (see
  `check_grid_bytes`): what works blockwise needs only the classes.

  Attributes:
    method: the canonical method ('euc', 'quant', 'product', 'cross_rows'
      or 'cross_cols').
    height: rows of the token grid.
    width: columns of the token grid.
    skip: leading non-spatial tokens.
    num_buckets: buckets of the table, including the skip bucket if
      `skip > 0`.
    ids: `(L, L)` read-only int32 bucket ids (a property, built on first
      access; raises `ValueError` past `MAX_IDS_BYTES`).
    row_class: `(2 * height - 1,)` int32 class of each row offset `dr`,
      in `[0, num_row_classes)`.
    col_class: `(2 * width - 1,)` int32 class of each column offset `dc`,
      in `[0, num_col_classes)`.
    pair_buckets: `(num_row_classes, num_col_classes)` int32 bucket of each
      class pair.
    key: the canonical arguments it was built from; its identity.
  """
  method: str
  height: int
  width: int
  skip: int
  num_buckets: int
  row_class: np.ndarray = dataclasses.field(repr=False)
  col_class: np.ndarray = dataclasses.field(repr=False)
  pair_buckets: np.ndarray = dataclasses.field(repr=False)
  key: tuple = dataclasses.field(repr=False)
  # The (2h - 1, 2w - 1) bucket of each offset, from which `ids` are built,
  # and the built ids (a dict: the dataclass is frozen).
  _offset_ids: np.ndarray = dataclasses.field(repr=False)
  _built: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def ids(self) -> np.ndarray:
    """`(L, L)` read-only int32 bucket ids, built on first access."""
    ids = self._built.get('ids')
    if ids is None:
      # One build at a time: two threads tracing the same model would
      # otherwise both allocate the (L, L) array.
      with _BUILD_LOCK:
        ids = self._built.get('ids')
        if ids is None:
          check_grid_bytes('(L, L) bucket ids', (self.length, self.length),
                           self.height, self.width, self.skip)
          ids = _read_only(_full_ids(self._offset_ids, self.height,
                                     self.width, self.skip,
                                     self.num_buckets - 1))
          self._built['ids'] = ids
    return ids

  @property
  def offset_ids(self) -> np.ndarray:
    """`(2h - 1, 2w - 1)` read-only int32 bucket of each spatial offset.

    `offset_ids[dr + h - 1, dc + w - 1]` is the bucket of every spatial pair
    at offset `(dr, dc)`; what blockwise attention reads a block's ids from.
    """
    return self._offset_ids

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, BucketGeometry) and self.key == other.key

  @property
  def length(self) -> int:
    """`L = skip + height * width`."""
    return self.skip + self.height * self.width

  @property
  def num_row_classes(self) -> int:
    return self.pair_buckets.shape[0]

  @property
  def num_col_classes(self) -> int:
    return self.pair_buckets.shape[1]


_BUILD_LOCK = threading.Lock()


def _offset_buckets(method, height, width, alpha, beta, gamma,
                    index_fn: _IndexFn) -> np.ndarray:
  """`(2h - 1, 2w - 1)` bucket of every spatial offset `(dr, dc)`."""
  dr = np.arange(-(height - 1), height, dtype=np.int64)[:, None]
  dc = np.arange(-(width - 1), width, dtype=np.int64)[None, :]
  shape = (2 * height - 1, 2 * width - 1)
  beta_int = int(beta)
  g = functools.partial(index_fn, alpha=alpha, beta=beta, gamma=gamma)
  if method == EUCLIDEAN:
    dist = np.round(np.sqrt((dr ** 2 + dc ** 2).astype(np.float32)))
    return g(dist) + beta_int
  if method == QUANT:
    return g(dr ** 2 + dc ** 2) + beta_int
  if method == PRODUCT:
    side = 2 * beta_int + 1
    return (g(dr) + beta_int) * side + g(dc) + beta_int
  if method == CROSS_ROWS:
    return np.broadcast_to(g(dr) + beta_int, shape)
  if method == CROSS_COLS:
    return np.broadcast_to(g(dc) + beta_int, shape)
  raise ValueError(
      f"method {method!r} has no single bucket table; 'cross' is the pair "
      f"('cross_rows', 'cross_cols').")


def _classes(table: np.ndarray, axis: int):
  """`(distinct slices, class of each slice)` of `table` along `axis`.

  Distinct slices come in lexicographic order, so that for 'product' the
  class pairs enumerate the buckets in order.
  """
  distinct, inverse = np.unique(table, axis=axis, return_inverse=True)
  return distinct, inverse.reshape(-1).astype(np.int32)


def _read_only(array: np.ndarray) -> np.ndarray:
  array = np.ascontiguousarray(array, dtype=np.int32)
  array.setflags(write=False)  # Shared by every caller through the cache.
  return array


def _full_ids(offset_ids: np.ndarray, height: int, width: int, skip: int,
              skip_bucket: int) -> np.ndarray:
  """`(L, L)` ids from the `(2h - 1, 2w - 1)` ids of the offsets.

  Written one query row at a time from a strided view of the offsets, so
  that the only large array is the result (a 100x100 grid: 400 MB).
  """
  n = skip + height * width
  ids = np.full((n, n), skip_bucket, np.int32)
  # windows[ri, ci, rj, cj] = offset_ids[ri - rj + h - 1, ci - cj + w - 1].
  windows = np.lib.stride_tricks.sliding_window_view(
      offset_ids[::-1, ::-1], (height, width))[::-1, ::-1]
  for ri in range(height):
    rows = slice(skip + ri * width, skip + (ri + 1) * width)
    ids[rows, skip:] = windows[ri].reshape(width, height * width)
  return ids


def _check_args(method, height, width, skip, alpha, beta, gamma, index_fn):
  method = canonical_method(method)
  height = _checks.check_int('height', height, 1)
  width = _checks.check_int('width', width, 1)
  skip = _checks.check_int('skip', skip, 0)
  if index_fn not in _INDEX_FUNCTIONS:
    raise ValueError(f'Unknown index_fn {index_fn!r}; expected one of '
                     f'{sorted(_INDEX_FUNCTIONS)}.')
  alpha, beta, gamma = _check_index_params(alpha, beta, gamma, index_fn)
  if method in TABLE_METHODS:
    num_buckets = num_buckets_without_skip(method, beta) + (skip > 0)
    if num_buckets > _MAX_BUCKETS:
      raise ValueError(f'beta={beta} gives {num_buckets} buckets for '
                       f'{method!r}, more than int32 ids can index '
                       f'({_MAX_BUCKETS}).')
  return method, height, width, skip, alpha, beta, gamma, index_fn


def get_bucket_geometry(method: Union[str, int], height: int, width: int,
                        skip: int, alpha: float, beta: float, gamma: float,
                        index_fn: str = 'piecewise') -> BucketGeometry:
  """The bucket ids of a `height x width` token grid, with their structure.

  Args:
    method: 'euc', 'quant', 'product', 'cross_rows' or 'cross_cols' (or an
      alias or release id; see `canonical_method`).
    height: rows of the token grid, `>= 1`.
    width: columns of the token grid, `>= 1`.
    skip: number of leading non-spatial tokens (class token, ...), `>= 0`.
    alpha: piecewise index parameter (`ratio`), `> 0`.
    beta: piecewise index parameter (`2 * ratio`), `>= alpha`.
    gamma: piecewise index parameter (`8 * ratio`), `> alpha` for
      'piecewise'.
    index_fn: 'piecewise' (the paper's g) or 'clip'.

  Returns:
    The cached `BucketGeometry`; `ids` is
    `(skip + height * width, skip + height * width)`, built on first access.
    The geometry costs `O((2h - 1) * (2w - 1))`; the ids `4 * L ** 2` bytes
    (1 GiB and about 2 s on one CPU core for a 128 x 128 grid), and raise
    `ValueError` past `MAX_IDS_BYTES` (2 GiB by default; see
    `check_grid_bytes`).
  """
  return _cached_geometry(*_check_args(method, height, width, skip, alpha,
                                       beta, gamma, index_fn))


def get_bucket_ids_2d(method: Union[str, int], height: int, width: int,
                      skip: int, alpha: float, beta: float, gamma: float,
                      index_fn: str = 'piecewise') -> Tuple[np.ndarray, int]:
  """Bucket ids of every (query, key) pair of a `height x width` token grid.

  Takes the arguments of `get_bucket_geometry`.

  Returns:
    `(bucket_ids, num_buckets)`: a read-only int32 array
    `(skip + height * width, skip + height * width)` and the bucket count,
    including the extra bucket shared by all pairs that touch a skip token.

  Raises:
    ValueError: if the ids would exceed `MAX_IDS_BYTES` (2 GiB by default,
      `L <= 23170`; see `check_grid_bytes`), before building them.
  """
  geometry = get_bucket_geometry(method, height, width, skip, alpha, beta,
                                 gamma, index_fn)
  return geometry.ids, geometry.num_buckets


@functools.lru_cache(maxsize=256)
def _cached_geometry(method, height, width, skip, alpha, beta, gamma,
                     index_fn) -> BucketGeometry:
  # Before the index function, which also makes a few float32 temporaries
  # of this shape.
  check_grid_bytes('offset table', (2 * height - 1, 2 * width - 1), height,
                   width, skip)
  offset_ids = _offset_buckets(method, height, width, alpha, beta, gamma,
                               _INDEX_FUNCTIONS[index_fn])
  row_tables, row_class = _classes(offset_ids, axis=0)
  pair_buckets, col_class = _classes(row_tables, axis=1)
  num_buckets = num_buckets_without_skip(method, beta) + (skip > 0)
  return BucketGeometry(
      method=method, height=height, width=width, skip=skip,
      num_buckets=num_buckets, row_class=_read_only(row_class),
      col_class=_read_only(col_class), pair_buckets=_read_only(pair_buckets),
      key=(method, height, width, skip, alpha, beta, gamma, index_fn),
      _offset_ids=_read_only(offset_ids))
