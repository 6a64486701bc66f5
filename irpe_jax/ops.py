"""Lookup of iRPE encodings: pure jax functions of features, tables and ids.

Shapes: `x (B, H, L, D)` per-head features, `a (B, H, L, L)` attention
weights, `nb` buckets, `Ht` table heads (H, or 1 when heads share the table).
`ids` is the static `buckets.BucketGeometry` of a table (what the modules
pass, through `core.rpe_lookup`), or its bare `(L, L)` int32 bucket ids.

Contextual q/k, computed as the paper's efficient implementation (Wu et al.,
ICCV 2021, Sec. 3.2): `z = x @ table (B, H, L, nb)`, then the bucket gather
`e[..., i, j] = z[..., i, ids[i, j]]`. Contextual v is the mirror: the bucket
scatter `s[..., i, t] = sum_{ids[i, j] = t} a[..., i, j]`, then `s @ table`.
Gather and scatter are each other's transpose; both also come transposed
(`transpose=True`: the encoding rpe_q adds to the logits is `e[..., j, i]`),
read and written in place rather than through a transpose pass over
`(..., L, L)`. How each is computed is the `impl`:

- 'factored': the gather is one `jnp.take` with a constant `(L * L,)` index
  into rows flattened to `(L * nb)` (see `_flat_gather`); the scatter sums
  over the geometry's row classes, then its column classes (see
  `irpe_jax._factored`). Each is the other's backward (custom VJP), so the
  contextual lookups emit no XLA scatter-add; the table contraction's
  gradient is a custom VJP too (see `_head_matmul`). Custom VJPs have no
  forward-mode autodiff (`jax.jvp`); the other impls keep it. Given bare
  ids, which carry no geometry, the scatter is the one-hot contraction.
- 'onehot': both directions as one-hot contractions (matrix units on TPU).
- 'naive': materialise the `(L, L, D)` encodings, as the release's v path
  does; `take_along_axis` and `segment_sum` for the bare gather and scatter.
- 'auto': the best choice for the backend. Measured on CPU with
  `python -m experiments.bench_rpe` (DeiT-S shapes): 'factored'. Reasoned, not
  measured: 'onehot' on TPU, where gathers are slow and one-hot contractions
  run on the matrix units; 'factored' on GPU, where its elementwise passes are
  memory-bound and its contextual lookups emit no scatter-add (slow on GPU).

XLA's own gather and scatter-add (`take_along_axis` and its autodiff, 8x
slower than 'factored' for rpe_k forward+backward on CPU) are kept as the
benchmark baseline `_xla_qk_encoding` / `_xla_v_encoding`, not as an impl.
"""

import functools
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import _factored
from irpe_jax.buckets import BucketGeometry

IMPLS = ('auto', 'factored', 'onehot', 'naive')

_HIGHEST = _factored.HIGHEST
_onehot = _factored.onehot

# Impls whose lookups have custom VJPs (no forward-mode autodiff).
_CUSTOM_VJP_IMPLS = ('factored',)

Ids = Union[BucketGeometry, np.ndarray]


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


def _unpack(ids: Ids, num_buckets: Optional[int] = None
            ) -> Tuple[np.ndarray, int, Optional[BucketGeometry]]:
  """`(ids (L, L), num_buckets, geometry or None)` of a geometry or bare ids."""
  if isinstance(ids, BucketGeometry):
    if num_buckets is not None and num_buckets != ids.num_buckets:
      raise ValueError(f'num_buckets={num_buckets}, but the geometry has '
                       f'{ids.num_buckets} buckets.')
    return ids.ids, ids.num_buckets, ids
  ids = np.asarray(ids)
  if ids.ndim != 2 or ids.shape[0] != ids.shape[1] or not np.issubdtype(
      ids.dtype, np.integer):
    raise ValueError(f'ids must be a BucketGeometry or square (L, L) integer '
                     f'bucket ids, got {ids.dtype} {ids.shape}.')
  if num_buckets is None:
    raise ValueError('num_buckets is needed with bare ids (a BucketGeometry '
                     'knows it).')
  return ids, num_buckets, None


def _check_last_axes(name: str, x: jax.Array, expected: Tuple[int, int]):
  if x.ndim < 2 or tuple(x.shape[-2:]) != expected:
    raise ValueError(f'{name} must have shape (..., {expected[0]}, '
                     f'{expected[1]}) for these ids, got {x.shape}.')


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


def _segment_scatter(a, ids, num_buckets):
  lq, lk = ids.shape
  seg = (np.arange(lq, dtype=np.int32)[:, None] * num_buckets + ids).ravel()
  flat = jnp.moveaxis(a.reshape(a.shape[:-2] + (lq * lk,)), -1, 0)
  out = jax.ops.segment_sum(flat, jnp.asarray(seg),
                            num_segments=lq * num_buckets)
  return jnp.moveaxis(out, 0, -1).reshape(a.shape[:-2] + (lq, num_buckets))


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


class _Static:
  """The static side of a custom-VJP lookup, hashable for `nondiff_argnums`.

  With a `geometry` the scatter is factored over it; without, it is the
  one-hot contraction of `ids`. `transpose` makes the gather return, and the
  scatter read, `(.., L, L)` arrays with the query and key axes swapped.
  """

  def __init__(self, ids: np.ndarray, num_buckets: int,
               geometry: Optional[BucketGeometry], transpose: bool):
    self.ids = ids
    self.num_buckets = num_buckets
    self.geometry = geometry
    self.transpose = transpose
    # A geometry hashes by its arguments; bare ids by their bytes.
    self._key = (geometry, transpose) if geometry is not None else (
        ids.shape, num_buckets, transpose, ids.tobytes())

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key == other._key


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_custom(z, static):
  return _flat_gather(z, static.ids, static.transpose)


def _gather_fwd(z, static):
  return _gather_custom(z, static), None


def _gather_bwd(static, _, g):
  return (_scatter_custom(g, static),)


_gather_custom.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scatter_custom(a, static):
  if static.geometry is not None:
    return _factored.scatter(a, static.geometry, static.transpose)
  return _contract_scatter(a, static.ids, static.num_buckets,
                           static.transpose)


def _scatter_fwd(a, static):
  return _scatter_custom(a, static), None


def _scatter_bwd(static, _, g):
  return (_gather_custom(g, static),)


_scatter_custom.defvjp(_scatter_fwd, _scatter_bwd)


def bucket_gather(z: jax.Array, ids: Ids, num_buckets: Optional[int] = None,
                  impl: str = 'auto', transpose: bool = False) -> jax.Array:
  """`e[..., i, j] = z[..., i, ids[i, j]]`.

  Args:
    z: `(..., L, nb)` per-query bucket values.
    ids: the `buckets.BucketGeometry` of the ids, or bare `(L, L)` static
      int32 bucket ids, all in `[0, nb)`.
    num_buckets: `nb`; may be left out with a geometry.
    impl: one of `IMPLS` ('naive' is `take_along_axis` here).
    transpose: return `e` with its last two axes swapped, `out[..., i, j] =
      z[..., j, ids[j, i]]`; 'factored' and 'onehot' read it
      straight from z, with no transpose pass over the `(L, L)` result.

  Returns:
    `(..., L, L)` array of `z.dtype`. Its gradient, with 'factored', is the
    factored `bucket_scatter` when `ids` is a geometry.
  """
  impl = resolve_impl(impl)
  ids, num_buckets, geometry = _unpack(ids, num_buckets)
  _check_last_axes('z', z, (ids.shape[0], num_buckets))
  if impl == 'factored':
    return _gather_custom(z, _Static(ids, num_buckets, geometry, transpose))
  if impl == 'onehot':
    return _contract_gather(z, ids, num_buckets, transpose)
  out = _take_gather(z, ids)
  return jnp.swapaxes(out, -1, -2) if transpose else out


def bucket_scatter(a: jax.Array, ids: Ids, num_buckets: Optional[int] = None,
                   impl: str = 'auto', transpose: bool = False) -> jax.Array:
  """`s[..., i, t] = sum_{j : ids[i, j] = t} a[..., i, j]`.

  Args:
    a: `(..., L, L)` values, e.g. attention weights.
    ids: the `buckets.BucketGeometry` of the ids, or bare `(L, L)` static
      int32 bucket ids, all in `[0, nb)`. 'factored' needs the geometry to
      factor the sum; with bare ids it is the one-hot contraction.
    num_buckets: `nb`; may be left out with a geometry.
    impl: one of `IMPLS` ('naive' is `segment_sum` here).
    transpose: read `a` with its last two axes swapped, `s[..., j, t] =
      sum_{i : ids[j, i] = t} a[..., i, j]` (the transpose of
      `bucket_gather(..., transpose=True)`), with no transpose pass for
      'factored' and 'onehot'.

  Returns:
    `(..., L, nb)` array of `a.dtype`.
  """
  impl = resolve_impl(impl)
  ids, num_buckets, geometry = _unpack(ids, num_buckets)
  _check_last_axes('a', a, ids.shape)
  if impl == 'factored':
    return _scatter_custom(a, _Static(ids, num_buckets, geometry, transpose))
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


def bias_encoding(table: jax.Array, ids: Ids, impl: str = 'auto',
                  transpose_output: bool = False) -> jax.Array:
  """Bias mode: `e[0, h, i, j] = table[h, ids[i, j]]`.

  Args:
    table: `(Ht, nb)` lookup table.
    ids: the table's `BucketGeometry`, or its bare `(L, L)` bucket ids.
    impl: one of `IMPLS`.
    transpose_output: return `e[0, h, j, i]` instead.

  Returns:
    `(1, Ht, L, L)`, broadcastable over the batch as in the release.
  """
  impl = resolve_impl(impl)
  ids, _, _ = _unpack(ids, table.shape[-1])
  if transpose_output:
    ids = np.ascontiguousarray(ids.T)
  if impl == 'onehot':
    onehot = _onehot(ids, table.shape[-1], table.dtype)
    out = jnp.einsum('hn,ijn->hij', table, onehot, precision=_HIGHEST)
  else:
    # Batch-free and tiny: the default gather and its scatter are cheap.
    out = jnp.take(table, jnp.asarray(ids), axis=1)
  return out[None]


def contextual_qk_encoding(x: jax.Array, table: jax.Array, ids: Ids,
                           impl: str = 'auto', transpose_output: bool = False
                           ) -> jax.Array:
  """Contextual mode on q or k: `e[b,h,i,j] = x[b,h,i,:] @ table[h,:,ids[i,j]]`.

  Args:
    x: `(B, H, L, D)` queries (for rpe_k) or keys (for rpe_q).
    table: `(Ht, D, nb)` lookup table, `Ht` in `{1, H}`.
    ids: the table's `BucketGeometry`, or its bare `(L, L)` bucket ids.
    impl: one of `IMPLS`.
    transpose_output: return `e[b, h, j, i]` instead, as rpe_q adds it to the
      logits; see `bucket_gather`.

  Returns:
    `(B, H, L, L)`.
  """
  impl = resolve_impl(impl)
  if impl == 'naive':
    ids, _, _ = _unpack(ids, table.shape[-1])
    weight = jnp.take(table, jnp.asarray(ids), axis=2)  # (Ht, D, L, L)
    out = jnp.einsum('bhid,hdij->bhij', x, weight)
    return jnp.swapaxes(out, -1, -2) if transpose_output else out
  z = _head_matmul(x, table, impl in _CUSTOM_VJP_IMPLS)
  return bucket_gather(z, ids, table.shape[-1], impl, transpose_output)


def contextual_v_encoding(a: jax.Array, table: jax.Array, ids: Ids,
                          impl: str = 'auto') -> jax.Array:
  """Contextual mode on v: `out[b,h,i] = sum_j a[b,h,i,j] table[h,ids[i,j]]`.

  Args:
    a: `(B, H, L, L)` attention weights.
    table: `(Ht, nb, D)` lookup table, `Ht` in `{1, H}`.
    ids: the table's `BucketGeometry`, or its bare `(L, L)` bucket ids.
    impl: one of `IMPLS`.

  Returns:
    `(B, H, L, D)`.
  """
  impl = resolve_impl(impl)
  if impl == 'naive':
    ids, _, _ = _unpack(ids, table.shape[1])
    weight = jnp.take(table, jnp.asarray(ids), axis=1)  # (Ht, L, L, D)
    return jnp.einsum('bhij,hijd->bhid', a, weight)
  s = bucket_scatter(a, ids, table.shape[1], impl)
  return _head_matmul(s, table, impl in _CUSTOM_VJP_IMPLS)


def _xla_qk_encoding(x: jax.Array, table: jax.Array, ids: Ids) -> jax.Array:
  """Baseline for benchmarks: `take_along_axis`, XLA's scatter-add backward."""
  ids, _, _ = _unpack(ids, table.shape[-1])
  return _take_gather(_head_einsum(x, table), ids)


def _xla_v_encoding(a: jax.Array, table: jax.Array, ids: Ids) -> jax.Array:
  """Baseline for benchmarks: `segment_sum`, XLA's gather backward."""
  ids, num_buckets, _ = _unpack(ids, table.shape[1])
  return _head_einsum(_segment_scatter(a, ids, num_buckets), table)
