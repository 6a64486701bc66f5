"""Lookup of iRPE encodings: pure jax functions of features, tables and ids.

Shapes: `x (B, H, L, D)` per-head features, `a (B, H, L, L)` attention
weights, `ids (L, L)` static int32 bucket ids, `nb` buckets, `Ht` table heads
(H, or 1 when heads share the table).

Contextual q/k (SPEC section 6): `z = x @ table (B, H, L, nb)`, then the
bucket gather `e[..., i, j] = z[..., i, ids[i, j]]`. Contextual v is the
mirror: the bucket scatter `s[..., i, t] = sum_{ids[i, j] = t} a[..., i, j]`,
then `s @ table`. Gather and scatter are each other's transpose; both also
come transposed (`transpose=True`: the encoding rpe_q adds to the logits is
`e[..., j, i]`), read and written in place rather than through a transpose
pass over `(..., L, L)`. How each is computed is the `impl`:

- 'gather': a gather with a constant `(L * L,)` index into rows flattened to
  `(L * nb)` (see `_flat_gather`), a contraction with the one-hot of `ids`
  for the scatter, each used as the other's backward (custom VJP),
  so the contextual lookups emit no XLA scatter-add. Custom VJPs have no
  forward-mode autodiff (`jax.jvp`); the impls below without one do.
- 'factored': as 'gather', but the scatter groups the ids by their structure
  over the token grid. Ids that depend on the relative offset give every key
  row offset a row class and every key column offset a column class, with
  `ids = pair_ids[row class, column class]` on the spatial tokens and one
  shared bucket for the pairs that touch a skip token. The scatter over
  `j = (rj, cj)` then becomes a sum over `rj` into row classes and a sum
  over `cj` into column classes, `O(L * h * nA * w + L * nA * nC * w)` per
  head instead of the `O(L * L * nb)` of the one-hot contraction ('product'
  and 'cross': `nA, nC <= 2b + 1`, each class pair its own bucket; about 4x
  fewer operations and 6x faster at DeiT-S shapes), as two fused
  elementwise passes that XLA vectorises, plus a small matmul from class
  pairs to buckets when pairs share buckets (euclidean, quantization). The
  grouping is found from the ids alone, with numpy at trace time (cached
  per ids); where it would not pay (or the ids have no grid structure) the
  scatter is the one-hot contraction of 'gather'. The table contraction's
  gradient is also a custom VJP here and in 'gather' (see `_head_matmul`).
- 'gather_xla': `take_along_axis` with XLA's default scatter-add backward; and
  `segment_sum` for v. Kept as the baseline the custom VJP is measured against.
- 'onehot': both directions as one-hot contractions (matrix units on TPU).
- 'naive': materialise the `(L, L, D)` encodings, as the release's v path does.
- 'auto': the best choice for the backend. Measured on CPU with
  `python -m experiments.bench_rpe` (DeiT-S shapes): 'factored'. Reasoned, not
  measured: 'onehot' on TPU, where gathers are slow and one-hot contractions
  run on the matrix units; 'factored' on GPU, where its elementwise passes are
  memory-bound and its contextual lookups emit no scatter-add (slow on GPU).
"""

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ('auto', 'factored', 'gather', 'gather_xla', 'onehot', 'naive')

_HIGHEST = jax.lax.Precision.HIGHEST

# Impls whose lookups have custom VJPs (no forward-mode autodiff).
_CUSTOM_VJP_IMPLS = ('factored', 'gather')


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to the fastest measured impl on the default backend."""
  if impl not in IMPLS:
    raise ValueError(f'Unknown impl {impl!r}; expected one of {IMPLS}.')
  if impl != 'auto':
    return impl
  # CPU: measured with experiments/bench_rpe.py. TPU and GPU: reasoned (see
  # the module docstring); gathers are slow on TPU, where the one-hot
  # contraction runs on the matrix units.
  return 'onehot' if jax.default_backend() == 'tpu' else 'factored'


def _onehot(ids: np.ndarray, num_buckets: int, dtype) -> jax.Array:
  # Built in-graph from the constant ids: a cheap iota compare, no 2 MB
  # constant in the HLO.
  return (jnp.asarray(ids)[..., None] ==
          jnp.arange(num_buckets, dtype=jnp.int32)).astype(dtype)


def _contract_gather(z, ids, num_buckets, transpose=False):
  onehot = _onehot(ids, num_buckets, z.dtype)
  spec = '...jn,jin->...ij' if transpose else '...in,ijn->...ij'
  return jnp.einsum(spec, z, onehot, precision=_HIGHEST)


def _contract_scatter(a, ids, num_buckets, transpose=False):
  onehot = _onehot(ids, num_buckets, a.dtype)
  spec = '...ij,jin->...jn' if transpose else '...ij,ijn->...in'
  return jnp.einsum(spec, a, onehot, precision=_HIGHEST)


def _take_gather(z, ids):
  idx = jnp.broadcast_to(jnp.asarray(ids), z.shape[:-2] + ids.shape)
  return jnp.take_along_axis(z, idx, axis=-1, mode='promise_in_bounds')


def _flat_gather(z, ids, transpose=False):
  """`_take_gather` with an `(L * L,)` index into rows flattened to `L * nb`.

  `take_along_axis` broadcasts the ids to full gather indices, `(..., L, L,
  ndim)` int32; when two lookups share them (rpe_q and rpe_k), XLA
  materialises that array (60 MB at DeiT-S batch 16) instead of fusing it.
  With `transpose`, `out[..., i, j] = z[..., j, ids[j, i]]`: the transposed
  encoding read straight from z, with no `(L, L)` transpose pass.
  """
  lq, nb = z.shape[-2:]
  rows_of = np.arange(lq, dtype=np.int32) * nb
  if transpose:
    flat = (rows_of[None, :] + ids.T).reshape(-1)
  else:
    flat = (rows_of[:, None] + ids).reshape(-1)
  rows = z.reshape((-1, lq * nb))
  out = jnp.take(rows, jnp.asarray(flat), axis=1, mode='clip')
  return out.reshape(z.shape[:-1] + (ids.shape[1],))


class _Grid(NamedTuple):
  """Bucket ids grouped by their structure over a `height x width` grid.

  For spatial tokens `i = skip + ri * width + ci`, `j = skip + rj * width + cj`:
  `ids[i, j] = pair_ids[row_class[ri, rj] * num_col_classes +
  col_class[ci, cj]]`, and every pair that touches one of the `skip` leading
  tokens has id `skip_bucket`.
  """
  skip: int
  height: int
  width: int
  skip_bucket: int
  row_class: np.ndarray  # (height, height) int32 in [0, num_row_classes).
  col_class: np.ndarray  # (width, width) int32 in [0, num_col_classes).
  pair_ids: np.ndarray  # (num_row_classes * num_col_classes,) ids.

  @property
  def num_row_classes(self) -> int:
    return int(self.row_class.max()) + 1

  @property
  def num_col_classes(self) -> int:
    return int(self.col_class.max()) + 1

  @property
  def pairs_are_buckets(self) -> bool:
    """Whether every (row class, column class) pair is its own bucket."""
    return len(np.unique(self.pair_ids)) == len(self.pair_ids)


def _divisors(n: int):
  return [d for d in range(1, n + 1) if n % d == 0]


def _classes(slices: np.ndarray) -> np.ndarray:
  """Class of each row of `slices`: equal rows share a class.

  Classes are numbered by their smallest id (then by first appearance), so
  that for 'product' ids the pair (row class, column class) enumerates the
  buckets in order.
  Rows are hashed with a fixed random projection and the classes checked
  exactly, so that large grids stay cheap at trace time.
  """
  slices = np.ascontiguousarray(slices, dtype=np.int64)
  weights = np.random.default_rng(0).integers(
      1, 2**62, size=slices.shape[1], dtype=np.int64)
  with np.errstate(over='ignore'):
    keys = slices @ weights  # Wraps around; any collision is caught below.
  _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  inverse = inverse.reshape(-1)
  if not np.array_equal(slices, slices[first[inverse]]):
    rows = slices.view(np.dtype((np.void, 8 * slices.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True,
                                  return_inverse=True)
    inverse = inverse.reshape(-1)
  order = np.lexsort((first, slices[first].min(axis=1)))
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return rank[inverse].astype(np.int32)


def _grid_cost(grid: _Grid, num_buckets: int) -> int:
  """Operations of `_grid_scatter` per head, the width in 8-lane vectors."""
  n = grid.height * grid.width
  n_rows, n_cols = grid.num_row_classes, grid.num_col_classes
  lanes = -(-grid.width // 8) * 8
  cost = n * (grid.height * n_rows + n_rows * n_cols) * lanes
  if not grid.pairs_are_buckets:
    cost += n * n_rows * n_cols * num_buckets // 4  # A plain matmul.
  return cost


def _find_grid(ids: np.ndarray, num_buckets: int) -> Optional[_Grid]:
  """The cheapest `_Grid` grouping of `ids`, or None if none pays.

  Tries every skip whose rows and columns hold one shared id, and every split
  of the remaining tokens into `height x width` (both >= 2: a `1 x n` split
  leaves nothing to group or vectorise). Key offsets (rj, cj) of query
  (ri, ci) group by row class, the `(width, width)` slice of ids that
  `(ri, rj)` sees, and by column class, the `(height, height)` slice that
  `(ci, cj)` sees: any ids that depend only on the relative offset have at
  most `2 * height - 1` row and `2 * width - 1` column classes ('product'
  and 'cross' have `2b + 1`, with one bucket per pair of classes). The split
  with the fewest operations wins; one that costs more than twice the
  one-hot contraction is refused.
  """
  length = ids.shape[0]
  best, best_cost = None, 2 * length * length * num_buckets
  for skip in range(length):
    if skip and not ((ids[:skip] == ids[0, 0]).all() and
                     (ids[:, :skip] == ids[0, 0]).all()):
      break
    n = length - skip
    # Squarest splits first: they are the likely winners, and their cost
    # lets the others be skipped before their classes are computed.
    for height in sorted(_divisors(n)[1:-1], key=lambda h: abs(h * h - n)):
      width = n // height
      lanes = -(-width // 8) * 8
      if n * (height + 1) * lanes >= best_cost:
        continue
      block = ids[skip:, skip:].reshape(height, width, height, width)
      row_class = _classes(
          block.transpose(0, 2, 1, 3).reshape(height * height, -1))
      n_rows = int(row_class.max()) + 1
      if n * (height + 1) * n_rows * lanes >= best_cost:
        continue
      col_class = _classes(
          block.transpose(1, 3, 0, 2).reshape(width * width, -1))
      n_cols = int(col_class.max()) + 1
      # Each class pair's id, read at one representative offset of each.
      row_rep = np.zeros(n_rows, np.int64)
      row_rep[row_class] = np.arange(height * height)
      col_rep = np.zeros(n_cols, np.int64)
      col_rep[col_class] = np.arange(width * width)
      pair_ids = block.transpose(0, 2, 1, 3).reshape(height * height, -1)[
          row_rep[:, None], col_rep[None, :]].reshape(-1)
      grid = _Grid(skip, height, width, int(ids[0, 0]) if skip else -1,
                   row_class.reshape(height, height),
                   col_class.reshape(width, width), pair_ids.astype(np.int32))
      cost = _grid_cost(grid, num_buckets)
      if cost < best_cost:
        best, best_cost = grid, cost
  return best


@functools.lru_cache(maxsize=64)
def _grid_of(sids: '_StaticIds') -> Optional[_Grid]:
  return _find_grid(sids.ids, sids.num_buckets)


def _grid_scatter(a: jax.Array, grid: _Grid, num_buckets: int,
                  transpose: bool = False) -> jax.Array:
  """`bucket_scatter` for ids that factorise as `grid`.

  Two passes, each an unrolled sum of broadcast products that XLA fuses into
  one vectorised loop (a reduction over the short contiguous axis, or a
  one-hot contraction, would not vectorise or would transpose the input):
  `u[.., i, ra, cj] = sum_rj a[.., i, (rj, cj)] [row_class[ri, rj] = ra]`,
  then `s[.., i, ra, cb] = sum_cj u[.., i, ra, cj] [col_class[ci, cj] = cb]`.
  With `transpose` the sums run over the query axis of `a` instead (see
  `_grid_passes_transposed`).
  """
  # Materialised once: fused, a producer such as the softmax would be
  # recomputed for every row class.
  x = jax.lax.optimization_barrier(
      a.astype(jnp.promote_types(a.dtype, jnp.float32)))
  if transpose:
    s, touching = _grid_passes_transposed(x, grid)
  else:
    s, touching = _grid_passes(x, grid)
  return _pairs_to_buckets(s, touching, grid, num_buckets).astype(a.dtype)


def _grid_passes(x, grid):
  """`(s (.., L, nA * nC), touching (.., L) or None without skip tokens)`."""
  length = x.shape[-1]
  skip, height, width = grid.skip, grid.height, grid.width
  n_rows, n_cols = grid.num_row_classes, grid.num_col_classes
  # Classes per query i = skip + ri * width + ci; skip queries have none (-1),
  # so the passes give them zeros.
  row_of_query = np.full((length, height), -1, np.int32)
  row_of_query[skip:] = np.repeat(grid.row_class, width, axis=0)
  col_of_query = np.full((length, width), -1, np.int32)
  col_of_query[skip:] = np.tile(grid.col_class, (height, 1))
  row_onehot = _onehot(row_of_query, n_rows, x.dtype)  # (L, rj, ra)
  u = 0
  for rj in range(height):
    keys = x[..., skip + rj * width:skip + (rj + 1) * width]  # (.., L, cj)
    u = u + keys[..., None, :] * row_onehot[:, rj, :, None]
  # Keep XLA from fusing the first pass into the second, which would
  # recompute it per column class.
  u = jax.lax.optimization_barrier(u)  # (.., L, ra, cj)
  col_onehot = _onehot(col_of_query, n_cols, x.dtype)  # (L, cj, cb)
  s = 0
  for cj in range(width):
    s = s + u[..., cj, None] * col_onehot[:, None, cj, :]
  # Materialise s in its natural layout before the (small) bucket assembly:
  # fused with the padding there, the pass above would not vectorise.
  s = jax.lax.optimization_barrier(s)
  s = s.reshape(x.shape[:-1] + (n_rows * n_cols,))
  # Pairs that touch a skip token: the skip keys of every query, and the
  # spatial keys of the skip queries.
  touching = None
  if skip:
    touching = x[..., :skip].sum(-1) + jnp.pad(
        x[..., :skip, skip:].sum(-1),
        [(0, 0)] * (x.ndim - 2) + [(0, length - skip)])
  return s, touching


def _grid_passes_transposed(x, grid):
  """As `_grid_passes`, for `s[.., j, t] = sum_i x[.., i, j] [ids[j, i] = t]`.

  Key j = skip + rj * width + cj plays the query's part in `grid`; the passes
  sum rows of x, each a contiguous `(L,)` vector over j:
  `u[.., ra, ci, j] = sum_ri x[.., (ri, ci), j] [row_class[rj, ri] = ra]`,
  `s[.., ra, cb, j] = sum_ci u[.., ra, ci, j] [col_class[cj, ci] = cb]`,
  then the small `(nA * nC, L)` result is transposed.
  """
  length = x.shape[-1]
  skip, height, width = grid.skip, grid.height, grid.width
  n_rows, n_cols = grid.num_row_classes, grid.num_col_classes
  row_of_key = np.full((height, length), -1, np.int32)  # (ri, j)
  row_of_key[:, skip:] = np.repeat(grid.row_class, width, axis=0).T
  col_of_key = np.full((width, length), -1, np.int32)  # (ci, j)
  col_of_key[:, skip:] = np.tile(grid.col_class, (height, 1)).T
  row_mask = jnp.moveaxis(_onehot(row_of_key, n_rows, x.dtype), -1, 1)
  u = 0
  for ri in range(height):
    queries = x[..., skip + ri * width:skip + (ri + 1) * width, :]  # (ci, j)
    u = u + queries[..., None, :, :] * row_mask[ri][:, None, :]
  u = jax.lax.optimization_barrier(u)  # (.., ra, ci, j)
  col_mask = jnp.moveaxis(_onehot(col_of_key, n_cols, x.dtype), -1, 1)
  s = 0
  for ci in range(width):
    s = s + u[..., :, None, ci, :] * col_mask[ci][None]  # (.., ra, cb, j)
  s = jax.lax.optimization_barrier(s)
  s = jnp.swapaxes(s.reshape(x.shape[:-2] + (n_rows * n_cols, length)),
                   -1, -2)
  # Skip pairs: the skip queries of every key, and the spatial queries of
  # the skip keys.
  touching = None
  if skip:
    touching = x[..., :skip, :].sum(-2) + jnp.pad(
        x[..., skip:, :skip].sum(-2),
        [(0, 0)] * (x.ndim - 2) + [(0, length - skip)])
  return s, touching


def _pairs_to_buckets(s, touching, grid, num_buckets):
  """`(.., L, nb)` buckets from per-class-pair sums and skip-pair sums."""
  n_pairs = grid.num_row_classes * grid.num_col_classes
  if not grid.pairs_are_buckets:
    # Several class pairs share a bucket (e.g. euclidean): a plain matmul
    # over the contiguous last axis.
    s = jnp.einsum('...p,pt->...t', s,
                   _onehot(grid.pair_ids, num_buckets, s.dtype),
                   precision=_HIGHEST)
  elif np.array_equal(grid.pair_ids, np.arange(n_pairs)):
    s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, num_buckets - n_pairs)])
  else:
    # Static permutation into bucket order; buckets no pair hits read a zero.
    source = np.full(num_buckets, n_pairs, np.int32)
    source[grid.pair_ids] = np.arange(n_pairs, dtype=np.int32)
    s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, 1)])
    s = jnp.take(s, jnp.asarray(source), axis=-1)
  if touching is not None:
    skip_onehot = (jnp.arange(num_buckets) == grid.skip_bucket).astype(s.dtype)
    s = s + touching[..., None] * skip_onehot
  return s


class _StaticIds:
  """Hashable wrapper so static ids can be a `nondiff_argnums` argument.

  `factored` asks the scatter to use the grid factorisation of the ids when
  they have one; `transpose` makes the gather return, and the scatter read,
  `(.., L, L)` arrays with the query and key axes swapped.
  """

  def __init__(self, ids: np.ndarray, num_buckets: int,
               factored: bool = False, transpose: bool = False):
    self.ids = ids
    self.num_buckets = num_buckets
    self.factored = factored
    self.transpose = transpose
    self._key = (ids.shape, num_buckets, factored, transpose, ids.tobytes())

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _StaticIds) and self._key == other._key


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_custom(z, sids):
  return _flat_gather(z, sids.ids, sids.transpose)


def _gather_fwd(z, sids):
  return _flat_gather(z, sids.ids, sids.transpose), None


def _gather_bwd(sids, _, g):
  return (_scatter_custom(g, sids),)


_gather_custom.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scatter_custom(a, sids):
  if sids.factored:
    grid = _grid_of(_StaticIds(sids.ids, sids.num_buckets))
    if grid is not None:
      return _grid_scatter(a, grid, sids.num_buckets, sids.transpose)
  return _contract_scatter(a, sids.ids, sids.num_buckets, sids.transpose)


def _scatter_fwd(a, sids):
  return _scatter_custom(a, sids), None


def _scatter_bwd(sids, _, g):
  return (_gather_custom(g, sids),)


_scatter_custom.defvjp(_scatter_fwd, _scatter_bwd)


def _segment_scatter(a, ids, num_buckets):
  lq, lk = ids.shape
  seg = (np.arange(lq, dtype=np.int32)[:, None] * num_buckets + ids).ravel()
  flat = jnp.moveaxis(a.reshape(a.shape[:-2] + (lq * lk,)), -1, 0)
  out = jax.ops.segment_sum(flat, jnp.asarray(seg),
                            num_segments=lq * num_buckets)
  return jnp.moveaxis(out, 0, -1).reshape(a.shape[:-2] + (lq, num_buckets))


def bucket_gather(z: jax.Array, ids: np.ndarray, num_buckets: int,
                  impl: str = 'auto', transpose: bool = False) -> jax.Array:
  """`e[..., i, j] = z[..., i, ids[i, j]]`.

  Args:
    z: `(..., L, nb)` per-query bucket values.
    ids: `(L, L)` static int32 bucket ids, all in `[0, nb)`.
    num_buckets: `nb`.
    impl: one of `IMPLS` ('naive' behaves as 'gather_xla' here).
    transpose: return `e` with its last two axes swapped, `out[..., i, j] =
      z[..., j, ids[j, i]]`; 'factored', 'gather' and 'onehot' read it
      straight from z, with no transpose pass over the `(L, L)` result.

  Returns:
    `(..., L, L)` array of `z.dtype`.
  """
  impl = resolve_impl(impl)
  if impl in ('gather', 'factored'):
    return _gather_custom(
        z, _StaticIds(ids, num_buckets, impl == 'factored', transpose))
  if impl == 'onehot':
    return _contract_gather(z, ids, num_buckets, transpose)
  out = _take_gather(z, ids)
  return jnp.swapaxes(out, -1, -2) if transpose else out


def bucket_scatter(a: jax.Array, ids: np.ndarray, num_buckets: int,
                   impl: str = 'auto', transpose: bool = False) -> jax.Array:
  """`s[..., i, t] = sum_{j : ids[i, j] = t} a[..., i, j]`.

  Args:
    a: `(..., L, L)` values, e.g. attention weights.
    ids: `(L, L)` static int32 bucket ids, all in `[0, nb)`.
    num_buckets: `nb`.
    impl: one of `IMPLS` ('naive' behaves as 'gather_xla' here).
    transpose: read `a` with its last two axes swapped, `s[..., j, t] =
      sum_{i : ids[j, i] = t} a[..., i, j]` (the transpose of
      `bucket_gather(..., transpose=True)`), with no transpose pass for
      'factored', 'gather' and 'onehot'.

  Returns:
    `(..., L, nb)` array of `a.dtype`.
  """
  impl = resolve_impl(impl)
  if impl in ('gather', 'factored'):
    return _scatter_custom(
        a, _StaticIds(ids, num_buckets, impl == 'factored', transpose))
  if impl == 'onehot':
    return _contract_scatter(a, ids, num_buckets, transpose)
  if transpose:
    a = jnp.swapaxes(a, -1, -2)
  return _segment_scatter(a, ids, num_buckets)


def _head_einsum(x: jax.Array, table: jax.Array) -> jax.Array:
  if table.shape[0] == 1:
    return jnp.einsum('bhlk,kn->bhln', x, table[0])
  return jnp.einsum('bhlk,hkn->bhln', x, table)


@jax.custom_vjp
def _head_matmul_vjp(x: jax.Array, table: jax.Array) -> jax.Array:
  return _head_einsum(x, table)


def _head_matmul_fwd(x, table):
  return _head_einsum(x, table), (x, table)


def _head_matmul_bwd(res, g):
  x, table = res
  if table.shape[0] == 1:
    dx = jnp.einsum('bhln,kn->bhlk', g, table[0])
    k, n = table.shape[1:]
    # Long sums over B * H * L rows: accumulate in float32 for bf16 inputs.
    dtable = jnp.dot(x.reshape(-1, k).T, g.reshape(-1, n),
                     preferred_element_type=jnp.float32)[None]
  else:
    dx = jnp.einsum('bhln,hkn->bhlk', g, table)
    dtable = jnp.einsum('bhlk,bhln->hkn', x, g,
                        preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dtable.astype(table.dtype)


_head_matmul_vjp.defvjp(_head_matmul_fwd, _head_matmul_bwd)


def _manual_axes(x: jax.Array) -> frozenset:
  """Mesh axes `x` varies over inside `shard_map` (empty outside)."""
  typeof = getattr(jax, 'typeof', None)
  if typeof is None:  # jax without varying-axis types.
    return frozenset()
  aval = typeof(x)
  mat = getattr(aval, 'mat', None)  # Newer jax; `vma` before.
  return frozenset(getattr(mat, 'varying', None) or
                   getattr(aval, 'vma', None) or ())


def _head_matmul(x: jax.Array, table: jax.Array,
                 custom_vjp: bool) -> jax.Array:
  """`out[b, h, l, :] = x[b, h, l, :] @ table[h]`, `table (Ht, K, N)`.

  The table's gradient sums over every (b, h, l) row. Left to autodiff, XLA
  CPU computes it from a transposed copy of the cotangent with a slow
  transposed-operand dot; with `custom_vjp` it is one matmul of `x^T` and the
  cotangent (rpe_k forward+backward about 1.3x faster at DeiT-S shapes).
  Only the impls that already have a custom VJP use it, so the others keep
  forward-mode autodiff. Inside `shard_map`, where a replicated table's
  gradient must be summed over the mesh, autodiff is left to do that.
  """
  if not custom_vjp or _manual_axes(x) != _manual_axes(table):
    return _head_einsum(x, table)
  return _head_matmul_vjp(x, table)


def bias_encoding(table: jax.Array, ids: np.ndarray,
                  impl: str = 'auto', transpose_output: bool = False
                  ) -> jax.Array:
  """Bias mode: `e[0, h, i, j] = table[h, ids[i, j]]`.

  Args:
    table: `(Ht, nb)` lookup table.
    ids: `(L, L)` static bucket ids.
    impl: one of `IMPLS`.
    transpose_output: return `e[0, h, j, i]` instead.

  Returns:
    `(1, Ht, L, L)`, broadcastable over the batch as in the release.
  """
  impl = resolve_impl(impl)
  if transpose_output:
    ids = np.ascontiguousarray(ids.T)
  if impl == 'onehot':
    onehot = _onehot(ids, table.shape[-1], table.dtype)
    out = jnp.einsum('hn,ijn->hij', table, onehot, precision=_HIGHEST)
  else:
    # Batch-free and tiny: the default gather and its scatter are cheap.
    out = jnp.take(table, jnp.asarray(ids), axis=1)
  return out[None]


def contextual_qk_encoding(x: jax.Array, table: jax.Array, ids: np.ndarray,
                           impl: str = 'auto', transpose_output: bool = False
                           ) -> jax.Array:
  """Contextual mode on q or k: `e[b,h,i,j] = x[b,h,i,:] @ table[h,:,ids[i,j]]`.

  Args:
    x: `(B, H, L, D)` queries (for rpe_k) or keys (for rpe_q).
    table: `(Ht, D, nb)` lookup table, `Ht` in `{1, H}`.
    ids: `(L, L)` static bucket ids.
    impl: one of `IMPLS`.
    transpose_output: return `e[b, h, j, i]` instead, as rpe_q adds it to the
      logits; see `bucket_gather`.

  Returns:
    `(B, H, L, L)`.
  """
  impl = resolve_impl(impl)
  if impl == 'naive':
    weight = jnp.take(table, jnp.asarray(ids), axis=2)  # (Ht, D, L, L)
    out = jnp.einsum('bhid,hdij->bhij', x, weight)
    return jnp.swapaxes(out, -1, -2) if transpose_output else out
  z = _head_matmul(x, table, impl in _CUSTOM_VJP_IMPLS)
  return bucket_gather(z, ids, table.shape[-1], impl, transpose_output)


def contextual_v_encoding(a: jax.Array, table: jax.Array, ids: np.ndarray,
                          impl: str = 'auto') -> jax.Array:
  """Contextual mode on v: `out[b,h,i,:] = sum_j a[b,h,i,j] table[h,ids[i,j],:]`.

  Args:
    a: `(B, H, L, L)` attention weights.
    table: `(Ht, nb, D)` lookup table, `Ht` in `{1, H}`.
    ids: `(L, L)` static bucket ids.
    impl: one of `IMPLS`.

  Returns:
    `(B, H, L, D)`.
  """
  impl = resolve_impl(impl)
  if impl == 'naive':
    weight = jnp.take(table, jnp.asarray(ids), axis=1)  # (Ht, L, L, D)
    return jnp.einsum('bhij,hijd->bhid', a, weight)
  s = bucket_scatter(a, ids, table.shape[1], impl)
  return _head_matmul(s, table, impl in _CUSTOM_VJP_IMPLS)


def table_shape(mode: str, transposed: bool, num_heads: int, head_dim: int,
                num_buckets: int) -> Tuple[str, Tuple[int, ...]]:
  """Name and shape of the lookup table, in the release's layout."""
  if mode == 'bias':
    if not transposed:
      raise ValueError("mode='bias' exists only on q and k (transposed=True); "
                       'there is no bias mode on v.')
    return 'lookup_table_bias', (num_heads, num_buckets)
  if transposed:
    return 'lookup_table_weight', (num_heads, head_dim, num_buckets)
  return 'lookup_table_weight', (num_heads, num_buckets, head_dim)
