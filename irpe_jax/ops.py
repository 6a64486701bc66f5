"""Lookup of iRPE encodings: pure jax functions of features, tables and ids.

Shapes: `x (B, H, L, D)` per-head features, `a (B, H, L, L)` attention
weights, `nb` buckets, `Ht` table heads (H, or 1 when heads share the table).
`ids` is the static `BucketGeometry` of a table (what the modules pass,
through `core.rpe_lookup`; build one with `irpe_jax.get_bucket_geometry`),
or its bare `(L, L)` int32 bucket ids. Give the public `bucket_gather` and
`bucket_scatter` the geometry: it is what the fast paths factor over.

Contextual q/k, computed as the paper's efficient implementation (Wu et al.,
ICCV 2021, Sec. 3.2): `z = x @ table (B, H, L, nb)`, then the bucket gather
`e[..., i, j] = z[..., i, ids[i, j]]`. Contextual v is the mirror: the bucket
scatter `s[..., i, t] = sum_{ids[i, j] = t} a[..., i, j]`, then `s @ table`.
Gather and scatter are each other's transpose; both also come with
`x_tokens_last=True` (the encoding rpe_q adds to the logits, `e[..., j, i]`,
with the tokens of z's rows on the last axis), read and written in place
rather than through a transpose pass over `(..., L, L)`. How each is
computed is the `impl`:

- 'factored': the gather is one `jnp.take` with a constant `(L * L,)` index
  into rows flattened to `(L * nb)` (see `_flat_gather`); the scatter sums
  over the geometry's row classes, then its column classes (see
  `irpe_jax._factored`). Each is the other's backward (custom VJP), so the
  contextual lookups emit no XLA scatter-add; the table contraction's
  gradient is a custom VJP too (see `_head_matmul`). Given bare ids, which
  carry no geometry, the scatter is the one-hot contraction.
- 'onehot': both directions as one-hot contractions, again each the
  other's backward: no gather and no scatter at all, only matmuls (the
  matrix units of a TPU).
- 'naive': materialise the `(L, L, D)` encodings, as the release's v path
  does; `take_along_axis` and `segment_sum` for the bare gather and scatter;
  plain autodiff.
- 'auto': chosen per platform when the function is lowered (by
  `jax.lax.platform_dependent`, not from the backend at trace time), so one
  jitted or exported function runs the right impl on every platform:
  'onehot' on TPU, 'factored' on CPU, GPU (CUDA, ROCm) and anything else
  (`AUTO_IMPLS`). On CPU 'factored' is measured fastest (`python -m
  experiments.bench_rpe`, DeiT-S shapes). On TPU 'onehot' is reasoned, not
  yet measured: gathers and scatters are slow there and one-hot
  contractions run on the matrix units. On GPU 'factored' is reasoned: its
  passes are memory-bound and its contextual lookups emit no scatter-add
  (slow, atomic, on GPU). `scripts/accelerator_check.sh` measures both.
  A function lowered for several platforms at once (`jax.export` with
  `platforms=`) holds every branch and picks one when it is compiled.

Mixed precision: the table may be wider than the input (float32 parameters,
bfloat16 compute). The lookup then computes in the input's dtype and the
table's gradient, a sum over every `(b, h, l)` row, is accumulated and
returned in float32 (see `_head_matmul`); the bucket scatters ('factored'
and 'onehot') sum in float32 too and round once. Forward-mode autodiff
(`jax.jvp`) needs 'naive' with input and table of one dtype: the other
paths are custom VJPs (and 'auto' holds them).

XLA's own gather and scatter-add (`take_along_axis` and its autodiff, 8x
slower than 'factored' for rpe_k forward+backward on CPU) are kept as the
benchmark baseline `_xla_qk_encoding` / `_xla_v_encoding`, not as an impl.
"""

import functools
from typing import Callable, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import _factored
from irpe_jax.buckets import BucketGeometry

IMPLS = ('auto', 'factored', 'onehot', 'naive')
# What 'auto' runs on each platform, chosen at lowering; every platform not
# named here (cpu, cuda, rocm, ...) runs AUTO_DEFAULT.
AUTO_IMPLS: Mapping[str, str] = {'tpu': 'onehot'}
AUTO_DEFAULT = 'factored'

_HIGHEST = _factored.HIGHEST
_onehot = _factored.onehot

# Impls whose lookups have custom VJPs (no forward-mode autodiff).
_CUSTOM_VJP_IMPLS = ('factored', 'onehot')

Ids = Union[BucketGeometry, np.ndarray]


def resolve_impl(impl: str, platform: Optional[str] = None) -> str:
  """The impl that `impl` runs on `platform`; raises for an unknown impl.

  Args:
    impl: one of `IMPLS`.
    platform: 'cpu', 'cuda', 'rocm', 'gpu', 'tpu', ...; default the default
      backend. Only informs: inside a function, 'auto' is decided when it
      is lowered, for the platform it is lowered for.

  Returns:
    `impl` itself, or for 'auto' the impl of `platform`.
  """
  if impl not in IMPLS:
    raise ValueError(f'Unknown impl {impl!r}; expected one of {IMPLS}.')
  if impl != 'auto':
    return impl
  platform = jax.default_backend() if platform is None else platform
  return AUTO_IMPLS.get(platform, AUTO_DEFAULT)


def _per_platform(fn: Callable[..., jax.Array], impl: str, *args: jax.Array,
                  **static) -> jax.Array:
  """`fn(*args, impl=impl, **static)`, 'auto' resolved at lowering time.

  For 'auto', every impl of `AUTO_IMPLS` is traced and the lowering keeps
  the one of the platform it lowers for (`jax.lax.platform_dependent`):
  a function jitted or exported on one backend still runs the right impl
  on another. Each branch is differentiable on its own; their custom VJPs
  (if any) sit inside the branches.
  """
  resolve_impl(impl)
  if impl != 'auto':
    return fn(*args, impl=impl, **static)
  branches = {platform: functools.partial(fn, impl=choice, **static)
              for platform, choice in AUTO_IMPLS.items()}
  return jax.lax.platform_dependent(
      *args, default=functools.partial(fn, impl=AUTO_DEFAULT, **static),
      **branches)


def _unpack(ids: Ids, num_buckets: Optional[int] = None
            ) -> Tuple[Ids, int, int]:
  """`(ids, L, num_buckets)` of a geometry (kept as is) or bare ids.

  A geometry's full `(L, L)` ids are not built here but by the paths that
  read them (`_full_ids`): the factored scatter needs only its classes.
  """
  if isinstance(ids, BucketGeometry):
    if num_buckets is not None and num_buckets != ids.num_buckets:
      raise ValueError(f'num_buckets={num_buckets}, but the geometry has '
                       f'{ids.num_buckets} buckets.')
    return ids, ids.length, ids.num_buckets
  ids = np.asarray(ids)
  if ids.ndim != 2 or ids.shape[0] != ids.shape[1] or not np.issubdtype(
      ids.dtype, np.integer):
    raise ValueError(f'ids must be a BucketGeometry or square (L, L) integer '
                     f'bucket ids, got {ids.dtype} {ids.shape}.')
  if num_buckets is None:
    raise ValueError('num_buckets is needed with bare ids (a BucketGeometry '
                     'knows it).')
  return ids, ids.shape[0], num_buckets


def _full_ids(ids: Ids) -> np.ndarray:
  """Bare ids, or a geometry's `(L, L)` ids (built within its size limit)."""
  return ids.ids if isinstance(ids, BucketGeometry) else ids


def _check_last_axes(name: str, x: jax.Array, expected: Tuple[int, int]):
  if x.ndim < 2 or tuple(x.shape[-2:]) != expected:
    raise ValueError(f'{name} must have shape (..., {expected[0]}, '
                     f'{expected[1]}) for these ids, got {x.shape}.')


def _contract_gather(z, ids, num_buckets, x_tokens_last=False):
  onehot = _onehot(ids, num_buckets, z.dtype)
  spec = '...jn,jin->...ij' if x_tokens_last else '...in,ijn->...ij'
  return jnp.einsum(spec, z, onehot, precision=_HIGHEST)


def _contract_scatter(a, ids, num_buckets, x_tokens_last=False):
  # Sums of up to L terms, in float32 and rounded once (see `_dot_wide`).
  onehot = _onehot(ids, num_buckets, a.dtype)
  spec = '...ij,jin->...jn' if x_tokens_last else '...ij,ijn->...in'
  return _dot_wide(spec, a, onehot, _HIGHEST).astype(a.dtype)


def _dot_wide(spec: str, a: jax.Array, b: jax.Array,
              precision=None) -> jax.Array:
  """`jnp.einsum(spec, a, b)` summed in float32 (or wider), returned so.

  Matrix units (TPU, GPU) take bf16 operands and sum in float32. XLA's CPU
  sums batched bf16 dots partly in bf16 (a one-hot scatter a third off at
  L = 1025) and lacks some bf16 x bf16 -> float32 dots, so there the
  operands are widened. Float32 operands take the plain einsum.
  """
  wide = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  if a.dtype == wide and b.dtype == wide:
    return jnp.einsum(spec, a, b, precision=precision)

  def contract(a, b, operand_dtype):
    return jnp.einsum(spec, a.astype(operand_dtype), b.astype(operand_dtype),
                      precision=precision, preferred_element_type=wide)

  return jax.lax.platform_dependent(
      a, b, cpu=functools.partial(contract, operand_dtype=wide),
      default=functools.partial(contract,
                                operand_dtype=jnp.result_type(a, b)))


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


def _flat_gather(z, ids, x_tokens_last=False):
  """`_take_gather` with an `(L * L,)` index into rows flattened to `L * nb`.

  `take_along_axis` broadcasts the ids to full gather indices, `(..., L, L,
  ndim)` int32; when two lookups share them (rpe_q and rpe_k), XLA
  materialises that array (60 MB at DeiT-S batch 16) instead of fusing it.
  With `x_tokens_last`, `out[..., i, j] = z[..., j, ids[j, i]]`: the
  swapped encoding read straight from z, with no `(L, L)` transpose pass.
  """
  lq, nb = z.shape[-2:]
  if lq * nb > np.iinfo(np.int32).max:
    # The flat int32 index would wrap, and mode='clip' would hide it.
    raise ValueError(f'z of shape {z.shape} flattens to rows of L * nb = '
                     f'{lq * nb} entries, more than an int32 gather index '
                     f'can address ({np.iinfo(np.int32).max}).')
  rows_of = np.arange(lq, dtype=np.int32) * nb
  if x_tokens_last:
    flat = (rows_of[None, :] + ids.T).reshape(-1)
  else:
    flat = (rows_of[:, None] + ids).reshape(-1)
  rows = z.reshape((-1, lq * nb))
  out = jnp.take(rows, jnp.asarray(flat), axis=1, mode='clip')
  return out.reshape(z.shape[:-1] + (ids.shape[1],))


class _Static:
  """The static side of a custom-VJP lookup, hashable for `nondiff_argnums`.

  `impl` 'factored': the gather takes from flattened rows and, with a
  `geometry`, the scatter is factored over it (without, it is the one-hot
  contraction of `ids`); 'onehot': both are one-hot contractions.
  `x_tokens_last` makes the gather return, and the scatter read,
  `(.., L, L)` arrays with their two axes swapped.
  """

  def __init__(self, impl: str, ids: Ids, num_buckets: int,
               x_tokens_last: bool):
    self.impl = impl
    self._source = ids
    self.num_buckets = num_buckets
    is_geometry = isinstance(ids, BucketGeometry)
    self.geometry = ids if is_geometry and impl == 'factored' else None
    self.x_tokens_last = x_tokens_last
    # A geometry hashes by its arguments; bare ids by their bytes.
    self._key = (impl, ids, x_tokens_last) if is_geometry else (
        impl, ids.shape, num_buckets, x_tokens_last, ids.tobytes())

  @property
  def ids(self) -> np.ndarray:
    """The full `(L, L)` ids, built only by the paths that read them."""
    return _full_ids(self._source)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key == other._key


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_custom(z, static):
  if static.impl == 'onehot':
    return _contract_gather(z, static.ids, static.num_buckets,
                            static.x_tokens_last)
  return _flat_gather(z, static.ids, static.x_tokens_last)


def _gather_fwd(z, static):
  return _gather_custom(z, static), None


def _gather_bwd(static, _, g):
  return (_scatter_custom(g, static),)


_gather_custom.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scatter_custom(a, static):
  if static.geometry is not None:
    return _factored.scatter(a, static.geometry, static.x_tokens_last)
  return _contract_scatter(a, static.ids, static.num_buckets,
                           static.x_tokens_last)


def _scatter_fwd(a, static):
  return _scatter_custom(a, static), None


def _scatter_bwd(static, _, g):
  return (_gather_custom(g, static),)


_scatter_custom.defvjp(_scatter_fwd, _scatter_bwd)


def _gather(z, ids, num_buckets, *, impl, x_tokens_last):
  ids, length, num_buckets = _unpack(ids, num_buckets)
  _check_last_axes('z', z, (length, num_buckets))
  if impl in _CUSTOM_VJP_IMPLS:
    return _gather_custom(z, _Static(impl, ids, num_buckets, x_tokens_last))
  out = _take_gather(z, _full_ids(ids))
  return jnp.swapaxes(out, -1, -2) if x_tokens_last else out


def _scatter(a, ids, num_buckets, *, impl, x_tokens_last):
  ids, length, num_buckets = _unpack(ids, num_buckets)
  _check_last_axes('a', a, (length, length))
  if impl in _CUSTOM_VJP_IMPLS:
    return _scatter_custom(a, _Static(impl, ids, num_buckets, x_tokens_last))
  if x_tokens_last:
    a = jnp.swapaxes(a, -1, -2)
  return _segment_scatter(a, _full_ids(ids), num_buckets)


def bucket_gather(z: jax.Array, ids: Ids, num_buckets: Optional[int] = None,
                  impl: str = 'auto', x_tokens_last: bool = False
                  ) -> jax.Array:
  """`e[..., i, j] = z[..., i, ids[i, j]]`.

  Args:
    z: `(..., L, nb)` per-token bucket values (row `i` for token `i` of x).
    ids: the `BucketGeometry` of the ids (`irpe_jax.get_bucket_geometry`),
      or bare `(L, L)` static int32 bucket ids, all in `[0, nb)`.
    num_buckets: `nb`; may be left out with a geometry.
    impl: one of `IMPLS` ('naive' is `take_along_axis` here).
    x_tokens_last: return `e` with z's tokens on the last axis,
      `out[..., i, j] = z[..., j, ids[j, i]]`; 'factored' and 'onehot'
      read it straight from z, with no transpose pass over the result.

  Returns:
    `(..., L, L)` array of `z.dtype`. Its gradient, with 'factored', is the
    factored `bucket_scatter` when `ids` is a geometry.
  """
  return _per_platform(_gather, impl, z, ids=ids, num_buckets=num_buckets,
                       x_tokens_last=x_tokens_last)


def bucket_scatter(a: jax.Array, ids: Ids, num_buckets: Optional[int] = None,
                   impl: str = 'auto', x_tokens_last: bool = False
                   ) -> jax.Array:
  """`s[..., i, t] = sum_{j : ids[i, j] = t} a[..., i, j]`.

  Args:
    a: `(..., L, L)` values, e.g. attention weights.
    ids: the `BucketGeometry` of the ids (`irpe_jax.get_bucket_geometry`),
      or bare `(L, L)` static int32 bucket ids, all in `[0, nb)`.
      'factored' needs the geometry to factor the sum; with bare ids it is
      the one-hot contraction.
    num_buckets: `nb`; may be left out with a geometry.
    impl: one of `IMPLS` ('naive' is `segment_sum` here).
    x_tokens_last: read `a` with the output's tokens on its last axis,
      `s[..., j, t] = sum_{i : ids[j, i] = t} a[..., i, j]` (the transpose
      of `bucket_gather(..., x_tokens_last=True)`), with no transpose pass
      for 'factored' and 'onehot'.

  Returns:
    `(..., L, nb)` array of `a.dtype`; 'factored' sums in float32 (or
    wider) whatever the dtype of `a`.
  """
  return _per_platform(_scatter, impl, a, ids=ids, num_buckets=num_buckets,
                       x_tokens_last=x_tokens_last)


def _head_einsum(x: jax.Array, table: jax.Array) -> jax.Array:
  table = table.astype(x.dtype)
  if table.shape[0] == 1:
    out = _dot_wide('bhlk,kn->bhln', x, table[0])
  else:
    out = _dot_wide('bhlk,hkn->bhln', x, table)
  return out.astype(x.dtype)


@jax.custom_vjp
def _head_matmul_vjp(x: jax.Array, table: jax.Array) -> jax.Array:
  return _head_einsum(x, table)


def _head_matmul_fwd(x, table):
  return _head_einsum(x, table), (x, table)


def _head_matmul_bwd(res, g):
  x, table = res
  compute = table.astype(x.dtype)
  # Long sums over B * H * L rows: accumulated in float32 for bf16 inputs,
  # and returned in the table's dtype (no bf16 rounding of a float32 table).
  if table.shape[0] == 1:
    dx = _dot_wide('bhln,kn->bhlk', g, compute[0])
    k, n = table.shape[1:]
    # As a 2-D dot of x^T and g: XLA CPU's fast form (see `_head_matmul`).
    dtable = _dot_wide('rk,rn->kn', x.reshape(-1, k), g.reshape(-1, n))[None]
  else:
    dx = _dot_wide('bhln,hkn->bhlk', g, compute)
    dtable = _dot_wide('bhlk,bhln->hkn', x, g)
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

  Computed in `x.dtype`. The table's gradient sums over every (b, h, l)
  row. Left to autodiff, XLA CPU computes it from a transposed copy of the
  cotangent with a slow transposed-operand dot, and a table wider than `x`
  (float32 parameters, bf16 compute) gets its gradient rounded to `x.dtype`
  by the cast. With the custom VJP it is one matmul of `x^T` and the
  cotangent, accumulated in float32 and returned in the table's dtype
  (rpe_k forward+backward about 1.3x faster at DeiT-S shapes on CPU). It is
  used by the impls that already have custom VJPs (`custom_vjp`) and
  wherever the dtypes differ; the others keep forward-mode autodiff. Inside
  `shard_map`, where a replicated table's gradient must be summed over the
  mesh, autodiff is left to do that.
  """
  if ((custom_vjp or table.dtype != x.dtype)
      and _manual_axes(x) == _manual_axes(table)):
    return _head_matmul_vjp(x, table)
  return _head_einsum(x, table)


def head_matmul(x: jax.Array, table: jax.Array) -> jax.Array:
  """`x (B, H, L, K) @ table (Ht, K, N)` per head, in x's dtype.

  The contraction of the contextual lookups (`z = x @ table`, and `s @
  table` on v), with their custom VJP: the table's gradient is one matmul
  accumulated in float32 and returned in the table's dtype. Blockwise
  attention computes its z with it.
  """
  return _head_matmul(x, table, custom_vjp=True)


def _bias(table, ids, *, impl, x_tokens_last):
  ids = _full_ids(_unpack(ids, table.shape[-1])[0])
  if x_tokens_last:
    ids = np.ascontiguousarray(ids.T)
  if impl == 'onehot':
    onehot = _onehot(ids, table.shape[-1], table.dtype)
    out = jnp.einsum('hn,ijn->hij', table, onehot, precision=_HIGHEST)
  else:
    # Batch-free and tiny: the default gather and its scatter are cheap.
    out = jnp.take(table, jnp.asarray(ids), axis=1)
  return out[None]


def bias_encoding(table: jax.Array, ids: Ids, impl: str = 'auto',
                  x_tokens_last: bool = False) -> jax.Array:
  """Bias mode: `e[0, h, i, j] = table[h, ids[i, j]]`.

  Args:
    table: `(Ht, nb)` lookup table.
    ids: the table's `BucketGeometry`, or its bare `(L, L)` bucket ids.
    impl: one of `IMPLS` ('onehot' contracts a one-hot, the others take).
    x_tokens_last: return `e[0, h, j, i]` instead (see `bucket_gather`).

  Returns:
    `(1, Ht, L, L)` of `table.dtype`, broadcastable over the batch as in
    the release.
  """
  return _per_platform(_bias, impl, table, ids=ids,
                       x_tokens_last=x_tokens_last)


def _contextual_qk(x, table, ids, *, impl, x_tokens_last):
  if impl == 'naive':
    ids = _full_ids(_unpack(ids, table.shape[-1])[0])
    # Taken in the table's dtype: the gradient's scatter-add sums in it.
    weight = jnp.take(table, jnp.asarray(ids), axis=2).astype(x.dtype)
    out = jnp.einsum('bhid,hdij->bhij', x, weight)  # weight (Ht, D, L, L)
    return jnp.swapaxes(out, -1, -2) if x_tokens_last else out
  z = _head_matmul(x, table, impl in _CUSTOM_VJP_IMPLS)
  return _gather(z, ids, table.shape[-1], impl=impl,
                 x_tokens_last=x_tokens_last)


def contextual_qk_encoding(x: jax.Array, table: jax.Array, ids: Ids,
                           impl: str = 'auto', x_tokens_last: bool = False
                           ) -> jax.Array:
  """Contextual mode on q or k: `e[b,h,i,j] = x[b,h,i,:] @ table[h,:,ids[i,j]]`.

  Args:
    x: `(B, H, L, D)` queries (for rpe_k) or keys (for rpe_q).
    table: `(Ht, D, nb)` lookup table, `Ht` in `{1, H}`; may be wider than
      `x` (its gradient then accumulates in float32).
    ids: the table's `BucketGeometry`, or its bare `(L, L)` bucket ids.
    impl: one of `IMPLS`.
    x_tokens_last: return `e[b, h, j, i]` instead, as rpe_q adds it to the
      logits; see `bucket_gather`.

  Returns:
    `(B, H, L, L)` of `x.dtype`.
  """
  return _per_platform(_contextual_qk, impl, x, table, ids=ids,
                       x_tokens_last=x_tokens_last)


def _contextual_v(a, table, ids, *, impl):
  if impl == 'naive':
    ids = _full_ids(_unpack(ids, table.shape[1])[0])
    weight = jnp.take(table, jnp.asarray(ids), axis=1).astype(a.dtype)
    return jnp.einsum('bhij,hijd->bhid', a, weight)  # weight (Ht, L, L, D)
  s = _scatter(a, ids, table.shape[1], impl=impl, x_tokens_last=False)
  return _head_matmul(s, table, impl in _CUSTOM_VJP_IMPLS)


def contextual_v_encoding(a: jax.Array, table: jax.Array, ids: Ids,
                          impl: str = 'auto') -> jax.Array:
  """Contextual mode on v: `out[b,h,i] = sum_j a[b,h,i,j] table[h,ids[i,j]]`.

  Args:
    a: `(B, H, L, L)` attention weights.
    table: `(Ht, nb, D)` lookup table, `Ht` in `{1, H}`; may be wider than
      `a` (its gradient then accumulates in float32).
    ids: the table's `BucketGeometry`, or its bare `(L, L)` bucket ids.
    impl: one of `IMPLS`.

  Returns:
    `(B, H, L, D)` of `a.dtype`.
  """
  return _per_platform(_contextual_v, impl, a, table, ids=ids)


def _xla_qk_encoding(x: jax.Array, table: jax.Array, ids: Ids) -> jax.Array:
  """Baseline for benchmarks: `take_along_axis`, XLA's scatter-add backward."""
  ids = _full_ids(_unpack(ids, table.shape[-1])[0])
  return _take_gather(_head_einsum(x, table), ids)


def _xla_v_encoding(a: jax.Array, table: jax.Array, ids: Ids) -> jax.Array:
  """Baseline for benchmarks: `segment_sum`, XLA's gather backward."""
  ids, _, num_buckets = _unpack(ids, table.shape[1])
  return _head_einsum(_segment_scatter(a, _full_ids(ids), num_buckets), table)
