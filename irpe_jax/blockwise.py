"""Blockwise (flash) attention with the iRPE terms computed inside each block.

The materialised path (`irpe_jax.attention`) forms the `(B, H, L, L)`
logits, weights and encodings, and autodiff keeps them for the backward
pass. Here queries go in blocks of `block_q` and, for each, keys in blocks
of `block_k` with the online softmax of FlashAttention (Dao et al., 2022):
a running row maximum and row sum in float32 rescale the partial output.
No array of size `L x L` per head exists, forward or backward; what is kept
for the backward pass is `O(L * (D + nb))` per head.

The iRPE terms fit the blocks because they need only small arrays and the
static bucket geometry (Wu et al., ICCV 2021, Sec. 3.2):

- contextual q/k: `z = x @ table`, `(B, H, L, nb)`, computed outside the
  loop; a block adds `z[i, ids[i, j]]` (rpe_k) or `z[j, ids[j, i]]` (rpe_q,
  `transposed`) to its logits, reading `(block, nb)` rows of `z`. With
  rpe_k, key blocks are whole rows of the token grid and its lookups copy
  rows of a per-query expansion of `z` (`_row_lookup`) instead of
  gathering each logit's value.
- bias q/k: a block adds `table[h, ids[i, j]]` (or `ids[j, i]`).
- contextual v: the bucket sums of the weights, `s[i, t] = sum_j p[i, j]
  [ids[i, j] = t]`, accumulate over key blocks with the same rescaling as
  the output; the caller multiplies them by the table once (`s @ table`).

A block's ids are computed from the geometry's `(2h - 1, 2w - 1)` offset
table and the block's token coordinates, so no `(L, L)` constant is built
or embedded in the program. The bucket scatters (the v sums and the
backward of the q/k terms) are XLA scatter-adds of each block on CPU and
GPU, and one-hot contractions on TPU (see `_segment_sum`).

The backward pass (a custom VJP) recomputes each block's weights from the
saved row maximum and row sum, as the flash backward does, and returns the
gradients of q, k, v and of every `z` and bias table. Attention dropout
draws each block's keep mask from `fold_in(fold_in(rng, query block), key
block)`, so the backward pass redraws the forward's mask.

Masks follow the materialised path: masked logits become the lowest
float32 (a query whose every key is masked attends uniformly to all keys);
nothing is padded: where the block size does not divide `L`, the last
block ends at `L` and overlaps the one before (see `_start`).
"""

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import _checks
from irpe_jax import _row_lookup
from irpe_jax.buckets import BucketGeometry

# Measured on CPU (iRPE-QKV, B = 1, H = 8, D = 32, forward+backward): 128
# beats 64 by 1.1-1.2x and 256 by 1.4-1.8x at L = 1025 and 4097; a block's
# (B, H, 128, 128) float32 arrays (512 KiB at B * H = 8) stay in cache.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128

_F32_MIN = float(np.finfo(np.float32).min)

# Key blocks of whole grid rows are used up to rows this many times
# `block_k` wide (a block's arrays grow with the row width).
MAX_GRID_ROW_BLOCK_FACTOR = 8


class LogitTerm(NamedTuple):
  """One iRPE term on the attention logits.

  Attributes:
    z: `(B, H, L, nb)` bucket values of each token (contextual mode:
      `x @ table`), or `(Ht, nb)` a bias table (bias mode; `Ht` 1 or H).
    geometry: the bucket geometry of the table.
    transposed: False for rpe_k (`z[i, ids[i, j]]`, the query's bucket
      values), True for rpe_q (`z[j, ids[j, i]]`, the key's).
  """
  z: jax.Array
  geometry: BucketGeometry
  transposed: bool = False


class _KeyBlocks(NamedTuple):
  """A run of key blocks: `length` keys from token `first`, `block` each.

  `index` numbers its first block for the dropout key. With `grid_rows`,
  each block is that many whole rows of the token grid (`block = rows *
  width`), for `_row_lookup`.
  """
  first: int
  length: int
  block: int
  index: int
  grid_rows: int = 0


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static side of one blockwise attention (hashable)."""
  block_q: int
  # (geometry, transposed, per_token) of each logit term.
  terms: Tuple[Tuple[BucketGeometry, bool, bool], ...]
  value_geometries: Tuple[BucketGeometry, ...]
  dropout_rate: float
  query_length: int
  # The key blocks, in the order the online softmax visits them.
  key_blocks: Tuple[_KeyBlocks, ...]


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _start(index, block: int, length: int):
  """First token of block `index`: `index * block`, the last block moved
  back to end at `length`.

  So every block lies inside the sequence and nothing is padded (a padded
  copy of each input and gradient would cost O(L) memory per array). The
  last block then overlaps its predecessor; its tokens before
  `index * block` are already covered, and the loops leave them out:
  their keys get no weight, their query rows are not written again and
  add nothing to the gradients.
  """
  return jnp.minimum(index * block, length - block)


def _block(x: jax.Array, start, block: int, axis: int = 2) -> jax.Array:
  """`block` tokens of `x` from `start` along its token axis."""
  return jax.lax.dynamic_slice_in_dim(x, start, block, axis=axis)


def _put(x: jax.Array, update: jax.Array, start, valid) -> jax.Array:
  """`x` with the `valid` rows of the block at `start` set to `update`."""
  block = update.shape[2]
  valid = valid.reshape((1, 1, block) + (1,) * (x.ndim - 3))
  update = jnp.where(valid, update.astype(x.dtype), _block(x, start, block))
  return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=2)


def _add(x: jax.Array, update: jax.Array, start) -> jax.Array:
  """`x` with `update` added to the block at `start` (token axis 2)."""
  block = update.shape[2]
  return jax.lax.dynamic_update_slice_in_dim(
      x, _block(x, start, block) + update, start, axis=2)


def block_ids(geometry: BucketGeometry, first: jax.Array,
              second: jax.Array) -> jax.Array:
  """`ids[first, second]` for broadcastable int32 token index arrays.

  Read from the geometry's `(2h - 1, 2w - 1)` offset buckets; pairs that
  touch a skip token (or a token past `L`, the padding of a block) get the
  skip bucket `num_buckets - 1`. Equal to `geometry.ids[first, second]`
  without building the `(L, L)` ids.
  """
  g = geometry
  r1, c1, s1 = _row_lookup.grid_coords(g, first)
  r2, c2, s2 = _row_lookup.grid_coords(g, second)
  offsets = jnp.asarray(g.offset_ids.reshape(-1))
  flat = (r1 - r2 + g.height - 1) * (2 * g.width - 1) + (c1 - c2 + g.width - 1)
  ids = jnp.take(offsets, flat, mode='clip')
  return jnp.where(s1 & s2, ids, g.num_buckets - 1)


class _PairIds:
  """The `(block_q, block_k)` ids of a block, per (geometry, transposed).

  `ids(g, False)[i, j] = g.ids[q_i, k_j]`, `ids(g, True)[i, j] =
  g.ids[k_j, q_i]`; each computed once per block, however many terms
  share it (rpe_k and rpe_v of one config do).
  """

  def __init__(self, q_tokens, k_tokens):
    self._q, self._k, self._cache = q_tokens, k_tokens, {}

  def __call__(self, geometry: BucketGeometry, transposed: bool):
    key = (geometry, transposed)
    if key not in self._cache:
      first, second = self._q[:, None], self._k[None, :]
      if transposed:
        first, second = self._k[None, :], self._q[:, None]
      self._cache[key] = block_ids(geometry, first, second)
    return self._cache[key]


def _segment_sum(a: jax.Array, segments: jax.Array, num_segments: int
                 ) -> jax.Array:
  """`out[..., n] = sum_{segments[m] = n} a[..., m]`, float32.

  On TPU a one-hot contraction (its matrix units; its scatter is slow); on
  CPU and GPU XLA's scatter-add, with the summed axis leading so that each
  update is one contiguous row: 7x faster than the contraction for a
  `(1, 8, 128, 128)` block into 50 buckets on CPU, and no
  `(block_q, block_k, nb)` one-hot in memory.
  """
  a = a.astype(jnp.float32)

  def scatter(a):
    rows = jnp.moveaxis(a, -1, 0)
    out = jax.ops.segment_sum(rows, segments, num_segments=num_segments)
    return jnp.moveaxis(out, 0, -1)

  def contract(a):
    onehot = (segments[:, None] == jnp.arange(num_segments, dtype=jnp.int32)
              ).astype(jnp.float32)
    return jnp.dot(a, onehot, precision=jax.lax.Precision.HIGHEST)

  # Chosen when traced, not by `lax.platform_dependent` (whose two branches
  # cost a fifth of a CPU compile here): both are right on every platform,
  # and a function exported elsewhere only runs the other's form.
  return contract(a) if jax.default_backend() == 'tpu' else scatter(a)


def _gather_rows(z: jax.Array, ids: jax.Array, transposed: bool
                 ) -> jax.Array:
  """`z (B, H, n, nb)` read at a block's ids: `(B, H, block_q, block_k)`.

  Not transposed, `n = block_q` and `out[i, j] = z[i, ids[i, j]]`;
  transposed, `n = block_k` and `out[i, j] = z[j, ids[i, j]]`. One take
  with a flat index into rows of `n * nb`, as `ops._flat_gather`.
  """
  n, nb = z.shape[-2:]
  rows = jnp.arange(n, dtype=jnp.int32) * nb
  flat = ids + (rows[None, :] if transposed else rows[:, None])
  out = jnp.take(z.reshape(z.shape[:-2] + (n * nb,)), flat.reshape(-1),
                 axis=-1, mode='clip')
  return out.reshape(z.shape[:-2] + ids.shape)


def _scatter_rows(a: jax.Array, ids: jax.Array, num_buckets: int,
                  transposed: bool) -> jax.Array:
  """Transpose of `_gather_rows`: `(B, H, bq, bk)` -> `(B, H, n, nb)` f32."""
  block_q, block_k = ids.shape
  if transposed:
    rows = jnp.arange(block_k, dtype=jnp.int32)[None, :] * num_buckets
    n = block_k
  else:
    rows = jnp.arange(block_q, dtype=jnp.int32)[:, None] * num_buckets
    n = block_q
  flat = a.reshape(a.shape[:-2] + (block_q * block_k,))
  out = _segment_sum(flat, (rows + ids).reshape(-1), n * num_buckets)
  return out.reshape(a.shape[:-2] + (n, num_buckets))


def _gather_bias(table: jax.Array, ids: jax.Array) -> jax.Array:
  """`(Ht, nb)` table at a block's ids: `(1, Ht, block_q, block_k)`."""
  return jnp.take(table, ids, axis=-1, mode='clip')[None]


def _scatter_bias(a: jax.Array, ids: jax.Array, num_buckets: int,
                  table_heads: int) -> jax.Array:
  """Transpose of `_gather_bias` summed over the batch: `(Ht, nb)` f32."""
  a = a.astype(jnp.float32).sum(0)
  if table_heads == 1:
    a = a.sum(0, keepdims=True)
  return _segment_sum(a.reshape(a.shape[0], -1), ids.reshape(-1),
                      num_buckets)


def _dropout_keep(plan: _Plan, rng, qi, kj, shape):
  key = jax.random.fold_in(jax.random.fold_in(rng, qi), kj)
  return jax.random.bernoulli(key, 1.0 - plan.dropout_rate, shape)


def _mask_block(mask, q_start, k_start, plan: _Plan, block_k: int):
  """The `(mb, mh, bq or 1, bk or 1)` block of the mask, or None."""
  if mask is None:
    return None
  if mask.shape[2] > 1:
    mask = _block(mask, q_start, plan.block_q, axis=2)
  if mask.shape[3] > 1:
    mask = _block(mask, k_start, block_k, axis=3)
  return mask


class _KeyBlock(NamedTuple):
  """One key block: its run, first token, token indices and which of
  them no earlier block covered."""
  blocks: _KeyBlocks
  start: jax.Array
  tokens: jax.Array
  new: jax.Array

  def first_row(self, geometry: BucketGeometry):
    return (self.start - geometry.skip) // geometry.width


def _key_block(blocks: _KeyBlocks, index) -> _KeyBlock:
  start, tokens, new = _tokens(index, blocks.block, blocks.length)
  return _KeyBlock(blocks, blocks.first + start, blocks.first + tokens, new)


def _row_lookups(plan: _Plan, q_tokens, z_blocks):
  """`RowLookup`s of a query block's rpe_k z blocks, if any key block is
  grid rows."""
  if not any(blocks.grid_rows for blocks in plan.key_blocks):
    return [None] * len(z_blocks)
  return [_row_lookup.RowLookup(g, q_tokens, z)
          for g, z in zip(_row_geometries(plan.terms), z_blocks)]


def _lookup_rows(z, lookup, key: _KeyBlock, pair_ids, geometry):
  """`z[i, ids[i, j]]` of a block: row copies on grid rows, else a gather."""
  if key.blocks.grid_rows:
    return lookup(key.first_row(geometry), key.blocks.grid_rows)
  return _gather_rows(z, pair_ids(geometry, False), False)


def _over_key_blocks(plan: _Plan, key_step, carry):
  """`carry` through `key_step(key_block, dropout_index, carry)` for every
  key block; a loop per run of blocks."""
  for blocks in plan.key_blocks:
    def body(index, carry, blocks=blocks):
      return key_step(_key_block(blocks, index), blocks.index + index, carry)
    count = _cdiv(blocks.length, blocks.block)
    carry = body(0, carry) if count == 1 else jax.lax.fori_loop(
        0, count, body, carry)
  return carry


def _block_logits(plan: _Plan, key: _KeyBlock, q_blk, k_blk, row_z,
                  row_lookups, col_z, biases, mask_blk, q_tokens):
  """float32 `(B, H, bq, bk)` logits of a block, masked, and its `_PairIds`.

  The keys no earlier block covered (`key.new`) are kept; the others get
  `-inf`.

  `row_z` (with `row_lookups`), `col_z` and `biases` hold, in the order of
  `plan.terms`, the z blocks of the untransposed per-token terms, of the
  transposed ones and the bias tables.
  """
  logits = jnp.einsum('bhid,bhjd->bhij', q_blk, k_blk)
  rows, lookups = iter(row_z), iter(row_lookups)
  cols, tables = iter(col_z), iter(biases)
  pair_ids = _PairIds(q_tokens, key.tokens)
  encodings = []
  for geometry, transposed, per_token in plan.terms:
    if per_token and not transposed:
      encodings.append(_lookup_rows(next(rows), next(lookups), key, pair_ids,
                                    geometry))
    elif per_token:
      encodings.append(_gather_rows(next(cols), pair_ids(geometry, True),
                                    True))
    else:
      encodings.append(_gather_bias(
          next(tables), pair_ids(geometry, transposed)).astype(logits.dtype))
  if encodings:
    # As the materialised path: the encodings summed, then added.
    logits = logits + sum(encodings[1:], encodings[0])
  logits = logits.astype(jnp.float32)
  if mask_blk is not None:
    logits = jnp.where(mask_blk, logits, _F32_MIN)
  if key.blocks.length % key.blocks.block:
    logits = jnp.where(key.new, logits, -jnp.inf)
  return logits, pair_ids


def _row_geometries(terms):
  """Geometries of the untransposed per-token (contextual rpe_k) terms."""
  return [g for g, transposed, per_token in terms
          if per_token and not transposed]


def _split_terms(plan: _Plan, zs):
  """`zs` in plan order -> (untransposed per-token, transposed, biases)."""
  rows, cols, biases = [], [], []
  for (_, transposed, per_token), z in zip(plan.terms, zs):
    (biases if not per_token else cols if transposed else rows).append(z)
  return rows, cols, biases


def _tokens(index, block: int, length: int):
  """`(start, token indices, which are new)` of block `index`."""
  start = _start(index, block, length)
  tokens = start + jnp.arange(block, dtype=jnp.int32)
  return start, tokens, tokens >= index * block


def _forward(plan: _Plan, q, k, v, zs, mask, rng):
  """`(out (B, H, Lq, D), m, l (B, H, Lq) f32, sums [(B, H, Lq, nb) f32])`.

  `m` and `l` are the float32 row maximum and row sum of the logits.
  """
  batch, heads, lq, _ = q.shape
  bq = plan.block_q
  rows, cols, biases = _split_terms(plan, zs)

  def query_block(qi, results):
    q_start, q_tokens, q_new = _tokens(qi, bq, lq)
    q_blk = _block(q, q_start, bq)
    row_z = [_block(z, q_start, bq) for z in rows]
    row_lookups = _row_lookups(plan, q_tokens, row_z)

    def key_step(key, dropout_index, carry):
      m, l, acc, sums = carry
      bk = key.blocks.block
      k_blk, v_blk = _block(k, key.start, bk), _block(v, key.start, bk)
      logits, pair_ids = _block_logits(
          plan, key, q_blk, k_blk, row_z, row_lookups,
          [_block(z, key.start, bk) for z in cols], biases,
          _mask_block(mask, q_start, key.start, plan, bk), q_tokens)
      m_new = jnp.maximum(m, logits.max(-1))
      rescale = jnp.exp(m - m_new)
      p = jnp.exp(logits - m_new[..., None])
      l = l * rescale + p.sum(-1)
      if plan.dropout_rate:
        keep = _dropout_keep(plan, rng, qi, dropout_index, p.shape)
        p = jnp.where(keep, p / (1.0 - plan.dropout_rate), 0.0)
      acc = acc * rescale[..., None] + jnp.einsum(
          'bhij,bhjd->bhid', p.astype(v_blk.dtype), v_blk,
          preferred_element_type=jnp.float32)
      sums = [s * rescale[..., None] + _scatter_rows(
          p, pair_ids(g, False), g.num_buckets, False)
              for s, g in zip(sums, plan.value_geometries)]
      return m_new, l, acc, sums

    init = (jnp.full((batch, heads, bq), _F32_MIN, jnp.float32),
            jnp.zeros((batch, heads, bq), jnp.float32),
            jnp.zeros((batch, heads, bq, v.shape[-1]), jnp.float32),
            [jnp.zeros((batch, heads, bq, g.num_buckets), jnp.float32)
             for g in plan.value_geometries])
    m, l, acc, sums = _over_key_blocks(plan, key_step, init)
    inverse = (1.0 / l)[..., None]
    out, m_all, l_all, sums_all = results
    return (_put(out, acc * inverse, q_start, q_new),
            _put(m_all, m, q_start, q_new), _put(l_all, l, q_start, q_new),
            [_put(a, s * inverse, q_start, q_new)
             for a, s in zip(sums_all, sums)])

  stats = jnp.zeros((batch, heads, lq), jnp.float32)
  init = (jnp.zeros((batch, heads, lq, v.shape[-1]), v.dtype), stats, stats,
          [jnp.zeros((batch, heads, lq, g.num_buckets), jnp.float32)
           for g in plan.value_geometries])
  return jax.lax.fori_loop(0, _cdiv(lq, bq), query_block, init)


def _backward(plan: _Plan, q, k, v, zs, mask, rng, out, m, l, sums, d_out,
              d_sums):
  """Gradients of q, k, v and of each z, recomputing the blocks' weights."""
  lq = q.shape[2]
  bq = plan.block_q
  f32 = jnp.float32
  rows, cols, biases = _split_terms(plan, zs)
  # delta_i = sum_j p_ij dp_ij, the softmax backward's row term: the
  # output's part and each bucket sum's part.
  delta = jnp.einsum('bhid,bhid->bhi', d_out.astype(f32), out.astype(f32))
  for s, ds in zip(sums, d_sums):
    delta = delta + jnp.einsum('bhit,bhit->bhi', s, ds.astype(f32))

  def query_block(qi, grads):
    q_start, q_tokens, q_new = _tokens(qi, bq, lq)
    q_blk, d_out_blk = _block(q, q_start, bq), _block(d_out, q_start, bq)
    m_blk, delta_blk = _block(m, q_start, bq), _block(delta, q_start, bq)
    inverse_l = 1.0 / _block(l, q_start, bq)
    row_z = [_block(z, q_start, bq) for z in rows]
    d_sum_blk = [_block(ds, q_start, bq).astype(f32) for ds in d_sums]
    row_lookups = _row_lookups(plan, q_tokens, row_z)
    # Rows an earlier block covered add nothing again.
    q_new = q_new[:, None]

    def key_step(key, dropout_index, grads):
      d_q_all, d_rows_all, d_k_all, d_v_all, d_cols_all, d_biases = grads
      bk, k_start = key.blocks.block, key.start
      k_blk, v_blk = _block(k, k_start, bk), _block(v, k_start, bk)
      mask_blk = _mask_block(mask, q_start, k_start, plan, bk)
      logits, pair_ids = _block_logits(
          plan, key, q_blk, k_blk, row_z, row_lookups,
          [_block(z, k_start, bk) for z in cols], biases, mask_blk, q_tokens)
      p = jnp.exp(logits - m_blk[..., None]) * inverse_l[..., None]
      p = jnp.where(q_new, p, 0.0)
      d_p = jnp.einsum('bhid,bhjd->bhij', d_out_blk, v_blk,
                       preferred_element_type=f32)
      # Row copies here measured 8% slower than the gather (iRPE-QKV, L =
      # 4097, CPU).
      for g, ds in zip(plan.value_geometries, d_sum_blk):
        d_p = d_p + _gather_rows(ds, pair_ids(g, False), False)
      p_used = p
      if plan.dropout_rate:
        keep = _dropout_keep(plan, rng, qi, dropout_index, p.shape)
        scale = 1.0 / (1.0 - plan.dropout_rate)
        p_used = jnp.where(keep, p * scale, 0.0)
        d_p = jnp.where(keep, d_p * scale, 0.0)
      d_v_all = _add(d_v_all, jnp.einsum(
          'bhij,bhid->bhjd', p_used.astype(v_blk.dtype), d_out_blk,
          preferred_element_type=f32), k_start)
      d_logits = p * (d_p - delta_blk[..., None])
      if mask_blk is not None:
        d_logits = jnp.where(mask_blk, d_logits, 0.0)
      d_compute = d_logits.astype(q_blk.dtype)
      d_q_all = _add(d_q_all, jnp.einsum(
          'bhij,bhjd->bhid', d_compute, k_blk, preferred_element_type=f32),
                     q_start)
      d_k_all = _add(d_k_all, jnp.einsum(
          'bhij,bhid->bhjd', d_compute, q_blk, preferred_element_type=f32),
                     k_start)
      d_rows_all, d_cols_all, d_biases = (list(d_rows_all), list(d_cols_all),
                                          list(d_biases))
      r = c = b = 0
      for (geometry, transposed, per_token), z in zip(plan.terms, zs):
        nb, ids = geometry.num_buckets, pair_ids(geometry, transposed)
        if not per_token:
          d_biases[b] = d_biases[b] + _scatter_bias(d_logits, ids, nb,
                                                    z.shape[0])
          b += 1
        elif transposed:
          d_cols_all[c] = _add(d_cols_all[c],
                               _scatter_rows(d_logits, ids, nb, True),
                               k_start)
          c += 1
        else:
          d_rows_all[r] = _add(d_rows_all[r],
                               _scatter_rows(d_logits, ids, nb, False),
                               q_start)
          r += 1
      return d_q_all, d_rows_all, d_k_all, d_v_all, d_cols_all, d_biases

    return _over_key_blocks(plan, key_step, grads)

  zeros = lambda x: jnp.zeros(x.shape, f32)
  init = (zeros(q), [zeros(z) for z in rows], zeros(k), zeros(v),
          [zeros(z) for z in cols], [zeros(t) for t in biases])
  d_q, d_rows, d_k, d_v, d_cols, d_biases = jax.lax.fori_loop(
      0, _cdiv(lq, bq), query_block, init)
  d_rows, d_cols, d_biases = iter(d_rows), iter(d_cols), iter(d_biases)
  d_zs = []
  for (_, transposed, per_token), z in zip(plan.terms, zs):
    d = next(d_biases) if not per_token else (
        next(d_cols) if transposed else next(d_rows))
    d_zs.append(d.astype(z.dtype))
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_zs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, zs, mask, rng):
  out, _, _, sums = _forward(plan, q, k, v, zs, mask, rng)
  return out, sums


def _attention_fwd(plan, q, k, v, zs, mask, rng):
  out, m, l, sums = _forward(plan, q, k, v, zs, mask, rng)
  return (out, sums), (q, k, v, zs, mask, rng, out, m, l, sums)


def _attention_bwd(plan, residuals, cotangents):
  q, k, v, zs, mask, rng, out, m, l, sums = residuals
  d_out, d_sums = cotangents
  d_q, d_k, d_v, d_zs = _backward(plan, q, k, v, zs, mask, rng, out, m, l,
                                  sums, d_out, d_sums)
  return d_q, d_k, d_v, d_zs, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _plan_key_blocks(block_k: int, length: int, terms
                     ) -> Tuple[_KeyBlocks, ...]:
  """The key blocks of an attention over `length` keys.

  `block_k` keys each, or, with a contextual rpe_k term whose grid's rows
  are at most `MAX_GRID_ROW_BLOCK_FACTOR * block_k` wide, blocks of whole
  grid rows (`round(block_k / width)` of them, at least one) after one
  block of the skip tokens, so that its lookups copy rows (`_row_lookup`):
  at L = 4097 on CPU, iRPE-K forward+backward takes 0.75x the time of the
  per-element gather's. (The v term's lookups, in the backward pass, stay
  gathers: as row copies they measured 8% slower.)
  """
  grids = {(g.height, g.width, g.skip) for g in _row_geometries(terms)}
  if len(grids) == 1:
    height, width, skip = grids.pop()
    if width <= MAX_GRID_ROW_BLOCK_FACTOR * block_k:
      rows = min(height, max(1, round(block_k / width)))
      blocks = [_KeyBlocks(0, skip, skip, 0)] if skip else []
      blocks.append(_KeyBlocks(skip, height * width, rows * width,
                               len(blocks), rows))
      return tuple(blocks)
  return (_KeyBlocks(0, length, block_k, 0),)


def _check_block(name: str, block: Optional[int], default: int,
                 length: int) -> int:
  block = default if block is None else _checks.check_int(name, block, 1)
  return min(block, length)


def _check_term(index: int, term: LogitTerm, batch: int, heads: int,
                lq: int, lk: int):
  g = term.geometry
  if not isinstance(g, BucketGeometry):
    raise TypeError(f'logit_terms[{index}].geometry must be a '
                    f'BucketGeometry, got {type(g).__name__}.')
  if g.length != lq or lq != lk:
    raise ValueError(f'logit_terms[{index}] has a geometry of L={g.length} '
                     f'tokens; iRPE needs self-attention over it, got '
                     f'{lq} queries and {lk} keys.')
  z, nb = term.z, g.num_buckets
  if z.ndim == 2:
    if z.shape[0] not in (1, heads) or z.shape[1] != nb:
      raise ValueError(f'logit_terms[{index}].z, a bias table, has shape '
                       f'{z.shape}; expected (1 or H={heads}, nb={nb}).')
  elif z.shape != (batch, heads, lq, nb):
    raise ValueError(f'logit_terms[{index}].z has shape {z.shape}; expected '
                     f'(B, H, L, nb) = {(batch, heads, lq, nb)} or a '
                     f'(Ht, nb) bias table.')


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    logit_terms: Sequence[LogitTerm] = (),
    value_geometries: Sequence[BucketGeometry] = (),
    mask: Optional[jax.Array] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
  """Softmax attention in blocks, with iRPE terms on logits and values.

  `out = softmax(q @ k^T + sum of terms, masked) @ v`, computed without any
  `(Lq, Lk)` array per head, forward or backward.

  Args:
    q: `(B, H, Lq, D)` queries, already scaled.
    k: `(B, H, Lk, D)` keys.
    v: `(B, H, Lk, Dv)` values.
    logit_terms: iRPE terms added to the logits (see `LogitTerm`); they
      need `Lq == Lk == geometry.length`.
    value_geometries: geometries of the contextual v terms; for each, the
      bucket sums of the weights are returned.
    mask: boolean, broadcastable to `(B, H, Lq, Lk)`, True = attend.
      Masked logits become the lowest float32, as in the materialised path.
    dropout_rate: attention dropout, in `[0, 1)`.
    dropout_rng: PRNG key for dropout, needed when `dropout_rate > 0`.
    block_q: queries per block (default 128, at most Lq).
    block_k: keys per block (default 128, at most Lk); with a contextual
      rpe_k term, rounded to whole rows of its token grid.

  Returns:
    `(out, sums)`: `out (B, H, Lq, Dv)` in v's dtype, and for each value
    geometry the float32 `(B, H, Lq, nb)` bucket sums of the (dropped-out)
    weights, `sums[t][b, h, i, n] = sum_{j: ids[i, j] = n} w[b, h, i, j]`.
  """
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 (B, H, L, D), got shape '
                       f'{x.shape}.')
  batch, heads, lq, dim = q.shape
  lk = k.shape[2]
  if k.shape != (batch, heads, lk, dim) or v.shape[:3] != (batch, heads, lk):
    raise ValueError(f'q {q.shape}, k {k.shape} and v {v.shape} must be '
                     f'(B, H, Lq, D), (B, H, Lk, D) and (B, H, Lk, Dv).')
  dropout_rate = _checks.check_number('dropout_rate', dropout_rate,
                                      minimum=0.0)
  if dropout_rate >= 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
  if dropout_rate and dropout_rng is None:
    raise ValueError(f'dropout_rate={dropout_rate} needs a dropout_rng.')
  logit_terms = tuple(LogitTerm(*t) for t in logit_terms)
  for i, term in enumerate(logit_terms):
    _check_term(i, term, batch, heads, lq, lk)
  value_geometries = tuple(value_geometries)
  for i, g in enumerate(value_geometries):
    if not isinstance(g, BucketGeometry) or g.length != lq or lq != lk:
      raise ValueError(f'value_geometries[{i}] must be a BucketGeometry of '
                       f'L = Lq = Lk = {lq} tokens (self-attention), got '
                       f'{g!r} with {lk} keys.')
  block_q = _check_block('block_q', block_q, DEFAULT_BLOCK_Q, lq)
  block_k = _check_block('block_k', block_k, DEFAULT_BLOCK_K, lk)
  terms = tuple((t.geometry, bool(t.transposed), t.z.ndim == 4)
                for t in logit_terms)
  plan = _Plan(
      block_q=block_q, terms=terms, value_geometries=value_geometries,
      dropout_rate=float(dropout_rate), query_length=lq,
      key_blocks=_plan_key_blocks(block_k, lk, terms))
  _checks.check_mask(mask, (batch, heads, lq, lk))
  rng = dropout_rng if dropout_rate else None
  out, sums = _attention(plan, q, k, v, [t.z for t in logit_terms], mask,
                         rng)
  return out, tuple(sums)
