"""Lookup of iRPE encodings: pure jax functions of features, tables and ids.

Shapes: `x (B, H, L, D)` per-head features, `a (B, H, L, L)` attention
weights, `ids (L, L)` static int32 bucket ids, `nb` buckets, `Ht` table heads
(H, or 1 when heads share the table).

Contextual q/k (SPEC section 6): `z = x @ table (B, H, L, nb)`, then the
bucket gather `e[..., i, j] = z[..., i, ids[i, j]]`. Contextual v is the
mirror: the bucket scatter `s[..., i, t] = sum_{ids[i, j] = t} a[..., i, j]`,
then `s @ table`. Gather and scatter are each other's transpose; how each is
computed is the `impl`:

- 'gather': `take_along_axis` for the gather, a contraction with the one-hot
  of `ids` for the scatter, each used as the other's backward (custom VJP),
  so no XLA scatter-add is ever emitted.
- 'gather_xla': `take_along_axis` with XLA's default scatter-add backward; and
  `segment_sum` for v. Kept as the baseline the custom VJP is measured against.
- 'onehot': both directions as one-hot contractions (matrix units on TPU).
- 'naive': materialise the `(L, L, D)` encodings, as the release's v path does.
- 'auto': the best measured choice for the backend.
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ('auto', 'gather', 'gather_xla', 'onehot', 'naive')

_HIGHEST = jax.lax.Precision.HIGHEST


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to the fastest measured impl on the default backend."""
  if impl not in IMPLS:
    raise ValueError(f'Unknown impl {impl!r}; expected one of {IMPLS}.')
  if impl != 'auto':
    return impl
  # Measured with experiments/bench_rpe.py: gathers are slow on TPU, where the
  # one-hot contraction runs on the matrix units; elsewhere the gather with the
  # one-hot backward wins.
  return 'onehot' if jax.default_backend() == 'tpu' else 'gather'


def _onehot(ids: np.ndarray, num_buckets: int, dtype) -> jax.Array:
  # Built in-graph from the constant ids: a cheap iota compare, no 2 MB
  # constant in the HLO.
  return (jnp.asarray(ids)[..., None] ==
          jnp.arange(num_buckets, dtype=jnp.int32)).astype(dtype)


def _contract_gather(z, ids, num_buckets):
  onehot = _onehot(ids, num_buckets, z.dtype)
  return jnp.einsum('...in,ijn->...ij', z, onehot, precision=_HIGHEST)


def _contract_scatter(a, ids, num_buckets):
  onehot = _onehot(ids, num_buckets, a.dtype)
  return jnp.einsum('...ij,ijn->...in', a, onehot, precision=_HIGHEST)


def _take_gather(z, ids):
  idx = jnp.broadcast_to(jnp.asarray(ids), z.shape[:-2] + ids.shape)
  return jnp.take_along_axis(z, idx, axis=-1, mode='promise_in_bounds')


class _StaticIds:
  """Hashable wrapper so static ids can be a `nondiff_argnums` argument."""

  def __init__(self, ids: np.ndarray, num_buckets: int):
    self.ids = ids
    self.num_buckets = num_buckets
    self._key = (ids.shape, num_buckets, ids.tobytes())

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _StaticIds) and self._key == other._key


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_custom(z, sids):
  return _take_gather(z, sids.ids)


def _gather_fwd(z, sids):
  return _take_gather(z, sids.ids), None


def _gather_bwd(sids, _, g):
  return (_scatter_custom(g, sids),)


_gather_custom.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scatter_custom(a, sids):
  return _contract_scatter(a, sids.ids, sids.num_buckets)


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
                  impl: str = 'auto') -> jax.Array:
  """`e[..., i, j] = z[..., i, ids[i, j]]`.

  Args:
    z: `(..., L, nb)` per-query bucket values.
    ids: `(L, L)` static int32 bucket ids, all in `[0, nb)`.
    num_buckets: `nb`.
    impl: one of `IMPLS` ('naive' behaves as 'gather_xla' here).

  Returns:
    `(..., L, L)` array of `z.dtype`.
  """
  impl = resolve_impl(impl)
  if impl == 'gather':
    return _gather_custom(z, _StaticIds(ids, num_buckets))
  if impl == 'onehot':
    return _contract_gather(z, ids, num_buckets)
  return _take_gather(z, ids)


def bucket_scatter(a: jax.Array, ids: np.ndarray, num_buckets: int,
                   impl: str = 'auto') -> jax.Array:
  """`s[..., i, t] = sum_{j : ids[i, j] = t} a[..., i, j]`.

  Args:
    a: `(..., L, L)` values, e.g. attention weights.
    ids: `(L, L)` static int32 bucket ids, all in `[0, nb)`.
    num_buckets: `nb`.
    impl: one of `IMPLS` ('naive' behaves as 'gather_xla' here).

  Returns:
    `(..., L, nb)` array of `a.dtype`.
  """
  impl = resolve_impl(impl)
  if impl == 'gather':
    return _scatter_custom(a, _StaticIds(ids, num_buckets))
  if impl == 'onehot':
    return _contract_scatter(a, ids, num_buckets)
  return _segment_scatter(a, ids, num_buckets)


def bias_encoding(table: jax.Array, ids: np.ndarray,
                  impl: str = 'auto') -> jax.Array:
  """Bias mode: `e[0, h, i, j] = table[h, ids[i, j]]`.

  Args:
    table: `(Ht, nb)` lookup table.
    ids: `(L, L)` static bucket ids.
    impl: one of `IMPLS`.

  Returns:
    `(1, Ht, L, L)`, broadcastable over the batch as in the release.
  """
  impl = resolve_impl(impl)
  if impl == 'onehot':
    onehot = _onehot(ids, table.shape[-1], table.dtype)
    out = jnp.einsum('hn,ijn->hij', table, onehot, precision=_HIGHEST)
  else:
    # Batch-free and tiny: the default gather and its scatter are cheap.
    out = jnp.take(table, jnp.asarray(ids), axis=1)
  return out[None]


def contextual_qk_encoding(x: jax.Array, table: jax.Array, ids: np.ndarray,
                           impl: str = 'auto') -> jax.Array:
  """Contextual mode on q or k: `e[b,h,i,j] = x[b,h,i,:] @ table[h,:,ids[i,j]]`.

  Args:
    x: `(B, H, L, D)` queries (for rpe_k) or keys (for rpe_q).
    table: `(Ht, D, nb)` lookup table, `Ht` in `{1, H}`.
    ids: `(L, L)` static bucket ids.
    impl: one of `IMPLS`.

  Returns:
    `(B, H, L, L)`.
  """
  impl = resolve_impl(impl)
  if impl == 'naive':
    weight = jnp.take(table, jnp.asarray(ids), axis=2)  # (Ht, D, L, L)
    return jnp.einsum('bhid,hdij->bhij', x, weight)
  z = jnp.einsum('bhld,hdn->bhln', x, table)
  return bucket_gather(z, ids, table.shape[-1], impl)


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
  return jnp.einsum('bhln,hnd->bhld', s, table)


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
