"""Fused iRPE attention: Pallas kernels for GPU (Triton) and TPU (Mosaic).

The computation of `irpe_jax.blockwise` (flash attention with the iRPE
terms inside each block; Dao et al., 2022; Wu et al., ICCV 2021), as three
kernels instead of a loop of XLA ops, so that a block's logits and weights
never leave the chip:

- forward, one program per `(batch, head, query block)`: its key blocks in
  a loop with the online softmax; it writes the output, the row
  maximum and row sum of the logits and, per contextual v term, the
  bucket sums of the weights.
- backward, two kernels that recompute the weights from those statistics:
  one program per query block (dq, the rpe_k `z` gradient and partial bias
  gradients) and one per key block (dk, dv, the rpe_q `z` gradient). Each
  output element has one writer and the partial bias gradients are summed
  outside, so results are deterministic.

In each block the bucket of a pair comes from token coordinates and the
geometry's row and column classes, and the lookups and bucket sums walk
the geometry's slots (`irpe_jax._kernel_lookup`): `O(P)` vector operations
per logit, `P` the number of class pairs plus one (50 for the release's
DeiT-iRPE). Tables and bucket values are re-indexed by slot outside the
kernels (`O(L * P)`), and mapped back to buckets there.

What the kernels do not take, `unsupported_reason` names (attention
dropout, masks that vary over queries, terms on different token grids, and
on GPU head sizes Triton cannot tile); `attention_with_rpe` falls back to
'blockwise' there under 'auto' and raises under 'pallas'.

Each program holds its head's keys and values (and, for rpe_q, its keys'
slot values) in fast memory, `O(L * (D + P))`: on TPU that bounds `L` by
VMEM (an estimate, not measured: tens of thousands of tokens at D = 64).

`backend='interpret'` runs the kernels in Pallas's interpreter, on any
platform (slow; for tests on CPU).
"""

import dataclasses
import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import _checks
from irpe_jax import _kernel_lookup as kl
from irpe_jax import blockwise
from irpe_jax.buckets import BucketGeometry

BACKENDS = ('tpu', 'gpu', 'interpret')
# Queries and keys per block, reasoned, not measured. TPU: 128, a full lane
# width (the key-side arrays are sliced along lanes); GPU: 64, between the
# forward (128) and backward (32) blocks of JAX's Triton flash kernel, as
# the three kernels here share one size; 4 warps.
DEFAULT_BLOCK = {'tpu': 128, 'gpu': 64, 'interpret': 128}

_F32_MIN = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class _Term:
  lookup: kl.KernelGeometry
  transposed: bool
  kind: str  # 'rows' (rpe_k values), 'cols' (rpe_q values) or 'bias'.
  table_heads: int = 0


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The static side of one fused attention (hashable)."""
  backend: str
  block_q: int
  block_k: int
  length: int
  padded_length: int
  height: int
  # Slots per row of every slot array: P rounded up (lanes on TPU, a
  # power of two for Triton).
  slot_width: int
  terms: Tuple[_Term, ...]
  values: Tuple[kl.KernelGeometry, ...]
  mask_shape: Optional[Tuple[int, int]]  # (mask batch, mask heads).

  def of_kind(self, kind):
    return [t for t in self.terms if t.kind == kind]


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def default_backend() -> str:
  """'tpu' or 'gpu' on those platforms, else 'interpret'."""
  platform = jax.default_backend()
  return {'tpu': 'tpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu'}.get(
      platform, 'interpret')


def unsupported_reason(q: jax.Array, v: jax.Array,
                       logit_terms: Sequence[blockwise.LogitTerm] = (),
                       value_geometries: Sequence[BucketGeometry] = (),
                       mask: Optional[jax.Array] = None,
                       dropout_rate: float = 0.0,
                       backend: Optional[str] = None) -> Optional[str]:
  """Why the kernels cannot take this attention, or None if they can.

  Args:
    q: `(B, H, L, D)` queries.
    v: `(B, H, L, Dv)` values.
    logit_terms, value_geometries, mask, dropout_rate: as
      `blockwise.blockwise_attention` takes them.
    backend: one of `BACKENDS`; default `default_backend()`.
  """
  backend = default_backend() if backend is None else backend
  if dropout_rate:
    return (f'attention dropout (dropout_rate={dropout_rate}) is not in the '
            f'kernels')
  if mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
    return (f'a mask that varies over queries (shape {mask.shape}) is not in '
            f'the kernels; they take key masks, broadcastable to '
            f'(B, H, 1, L)')
  grids = {(g.height, g.width, g.skip) for g in
           [t.geometry for t in logit_terms] + list(value_geometries)}
  if len(grids) > 1:
    return (f'the iRPE terms are on different token grids (height, width, '
            f'skip) {sorted(grids)}; the kernels need one')
  if backend == 'gpu':
    for name, size in (('D', q.shape[-1]), ('Dv', v.shape[-1])):
      if size < 16 or size != _next_power_of_2(size):
        return (f'on GPU the head size {name}={size} must be a power of two '
                f'of at least 16 (Triton tiles)')
  return None


def _check_blocks(backend: str, block_q: Optional[int],
                  block_k: Optional[int]) -> Tuple[int, int]:
  out = []
  for name, block in (('block_q', block_q), ('block_k', block_k)):
    block = (DEFAULT_BLOCK[backend] if block is None
             else _checks.check_int(name, block, 1))
    if backend == 'gpu' and (block < 16 or block != _next_power_of_2(block)):
      raise ValueError(f'{name} must be a power of two of at least 16 on '
                       f'GPU, got {block}.')
    if backend == 'tpu':
      multiple = 8 if name == 'block_q' else 128
      if block % multiple:
        raise ValueError(f'{name} must be a multiple of {multiple} on TPU, '
                         f'got {block}.')
    out.append(block)
  return tuple(out)


def _compiler_params(spec: _Spec, grid_rank: int):
  if spec.backend == 'tpu':
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    params = getattr(pltpu, 'CompilerParams', None) or pltpu.TPUCompilerParams
    return params(dimension_semantics=('parallel',) * grid_rank)
  if spec.backend == 'gpu':
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    params = (getattr(plgpu, 'CompilerParams', None)
              or plgpu.TritonCompilerParams)
    return params(num_warps=4, num_stages=2)
  return None


def _pallas_call(spec: _Spec, kernel, name: str, grid, in_specs, out_specs,
                 out_shape):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=spec.backend == 'interpret',
      compiler_params=_compiler_params(spec, len(grid)), name=name)


class _BlockTerms:
  """A block's logits and its slots, shared by the three kernels."""

  def __init__(self, spec: _Spec, q_rows, q_cols, k_rows, k_cols):
    self._spec = spec
    self._row_offsets = q_rows - k_rows
    self._col_offsets = q_cols - k_cols
    self._spatial = kl.spatial_pairs(self._row_offsets, spec.height)
    self._cache = {}

  def slots(self, lookup: kl.KernelGeometry, transposed: bool):
    key = (lookup, transposed)
    if key not in self._cache:
      self._cache[key] = lookup.slots(self._row_offsets, self._col_offsets,
                                      self._spatial, transposed)
    return self._cache[key]

  def logits(self, q, k, term_values, key_start, mask_row):
    """float32 `(bq, bk)` logits: `q k^T` plus the terms, masked."""
    spec = self._spec
    logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    encodings = []
    for term, values in zip(spec.terms, term_values):
      slots = self.slots(term.lookup, term.transposed)
      n = term.lookup.num_slots
      if term.kind == 'cols':
        encodings.append(kl.lookup_cols(values, slots, n))
      else:
        encodings.append(kl.lookup_rows(values, slots, n))
    if encodings:
      logits = logits + sum(encodings[1:], encodings[0])
    if mask_row is not None:
      logits = jnp.where(mask_row != 0, logits, _F32_MIN)
    if spec.padded_length != spec.length:
      tokens = key_start + jax.lax.broadcasted_iota(
          jnp.int32, (1, spec.block_k), 1)
      logits = jnp.where(tokens < spec.length, logits, -jnp.inf)
    return logits


def _split(refs, counts):
  out, i = [], 0
  for n in counts:
    out.append(refs[i:i + n])
    i += n
  return out


def _term_values(spec: _Spec, term_refs, q_slice, k_slice):
  """Each term's float32 values for a block: `(bq, W)` rows, `(W, bk)`
  cols, `(1, W)` bias."""
  out = []
  for term, ref in zip(spec.terms, term_refs):
    if term.kind == 'rows':
      out.append(ref[q_slice, :].astype(jnp.float32))
    elif term.kind == 'cols':
      out.append(ref[:, k_slice].astype(jnp.float32))
    else:
      out.append(ref[...].astype(jnp.float32))
  return out


def _forward_kernel(spec: _Spec, *refs):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  bq, bk, width = spec.block_q, spec.block_k, spec.slot_width
  n_mask = spec.mask_shape is not None
  (q_ref, k_ref, v_ref, qr_ref, qc_ref, kr_ref, kc_ref), term_refs, \
      mask_refs, (out_ref, m_ref, l_ref), sum_refs = _split(
          refs, (7, len(spec.terms), n_mask, 3, len(spec.values)))
  q = q_ref[...]
  q_rows, q_cols = qr_ref[...], qc_ref[...]
  all_q = slice(None)

  def key_block(j, carry):
    m, l, acc, sums = carry
    start = pl.multiple_of(j * bk, bk)
    k_slice = pl.ds(start, bk)
    k, v = k_ref[k_slice, :], v_ref[k_slice, :]
    block = _BlockTerms(spec, q_rows, q_cols, kr_ref[:, k_slice],
                        kc_ref[:, k_slice])
    logits = block.logits(
        q, k, _term_values(spec, term_refs, all_q, k_slice), start,
        mask_refs[0][:, k_slice] if n_mask else None)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new)
    l = l * rescale + jnp.sum(p, axis=1, keepdims=True)
    acc = acc * rescale + jnp.dot(p.astype(v.dtype), v,
                                  preferred_element_type=jnp.float32)
    sums = [s * rescale + kl.scatter_rows(
        p, block.slots(g, False), g.num_slots, width)
            for s, g in zip(sums, spec.values)]
    return m_new, l, acc, sums

  init = (jnp.full((bq, 1), _F32_MIN, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
          [jnp.zeros((bq, width), jnp.float32) for _ in spec.values])
  m, l, acc, sums = jax.lax.fori_loop(
      0, spec.padded_length // bk, key_block, init)
  inverse = 1.0 / l
  out_ref[...] = (acc * inverse).astype(out_ref.dtype)
  # m and l, not m + log(l): with every key masked, m is the lowest
  # float32 and would absorb log(l).
  m_ref[...], l_ref[...] = m, l
  for ref, s in zip(sum_refs, sums):
    ref[...] = s * inverse


def _weights_and_grads(spec: _Spec, block: '_BlockTerms', logits, m,
                        inverse_l, do, v, d_sums, delta, mask_row):
  """`(p, d_logits)` of a backward block: its weights, from the forward's
  row statistics, and the gradient of its logits (zero where masked)."""
  p = jnp.exp(logits - m) * inverse_l
  d_p = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
  for g, ds in zip(spec.values, d_sums):
    d_p = d_p + kl.lookup_rows(ds, block.slots(g, False), g.num_slots)
  d_logits = p * (d_p - delta)
  if mask_row is not None:
    d_logits = jnp.where(mask_row != 0, d_logits, 0.0)
  return p, d_logits


def _dq_kernel(spec: _Spec, *refs):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  bk, width = spec.block_k, spec.slot_width
  n_mask, n_v = spec.mask_shape is not None, len(spec.values)
  n_rows, n_bias = len(spec.of_kind('rows')), len(spec.of_kind('bias'))
  (q_ref, k_ref, v_ref, qr_ref, qc_ref, kr_ref, kc_ref), term_refs, \
      mask_refs, (do_ref, m_ref, l_ref, delta_ref), d_sum_refs, (dq_ref,), \
      d_row_refs, d_bias_refs = _split(
          refs, (7, len(spec.terms), n_mask, 4, n_v, 1, n_rows, n_bias))
  q, do = q_ref[...], do_ref[...]
  m, inverse_l, delta = m_ref[...], 1.0 / l_ref[...], delta_ref[...]
  q_rows, q_cols = qr_ref[...], qc_ref[...]
  d_sums = [ref[...] for ref in d_sum_refs]
  all_q = slice(None)

  def key_block(j, carry):
    dq, d_rows, d_biases = carry
    start = pl.multiple_of(j * bk, bk)
    k_slice = pl.ds(start, bk)
    k, v = k_ref[k_slice, :], v_ref[k_slice, :]
    mask_row = mask_refs[0][:, k_slice] if n_mask else None
    block = _BlockTerms(spec, q_rows, q_cols, kr_ref[:, k_slice],
                        kc_ref[:, k_slice])
    logits = block.logits(
        q, k, _term_values(spec, term_refs, all_q, k_slice), start, mask_row)
    _, d_logits = _weights_and_grads(spec, block, logits, m, inverse_l, do,
                                     v, d_sums, delta, mask_row)
    dq = dq + jnp.dot(d_logits.astype(k.dtype), k,
                      preferred_element_type=jnp.float32)
    rows, biases = iter(range(n_rows)), iter(range(n_bias))
    d_rows, d_biases = list(d_rows), list(d_biases)
    for term in spec.terms:
      if term.kind == 'cols':
        continue
      scattered = kl.scatter_rows(
          d_logits, block.slots(term.lookup, term.transposed),
          term.lookup.num_slots, width)
      if term.kind == 'rows':
        r = next(rows)
        d_rows[r] = d_rows[r] + scattered
      else:
        b = next(biases)
        d_biases[b] = d_biases[b] + jnp.sum(scattered, axis=0,
                                            keepdims=True)
    return dq, d_rows, d_biases

  init = (jnp.zeros(q.shape, jnp.float32),
          [jnp.zeros((q.shape[0], width), jnp.float32)] * n_rows,
          [jnp.zeros((1, width), jnp.float32)] * n_bias)
  dq, d_rows, d_biases = jax.lax.fori_loop(
      0, spec.padded_length // bk, key_block, init)
  dq_ref[...] = dq
  for ref, d in zip(d_row_refs + d_bias_refs, d_rows + d_biases):
    ref[...] = d


def _dkv_kernel(spec: _Spec, *refs):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  bq, width = spec.block_q, spec.slot_width
  n_mask, n_v = spec.mask_shape is not None, len(spec.values)
  cols = spec.of_kind('cols')
  (q_ref, k_ref, v_ref, qr_ref, qc_ref, kr_ref, kc_ref), term_refs, \
      mask_refs, (do_ref, m_ref, l_ref, delta_ref), d_sum_refs, \
      (dk_ref, dv_ref), d_col_refs = _split(
          refs, (7, len(spec.terms), n_mask, 4, n_v, 2, len(cols)))
  k, v = k_ref[...], v_ref[...]
  k_start = pl.program_id(2) * spec.block_k
  k_rows, k_cols = kr_ref[...], kc_ref[...]
  mask_row = mask_refs[0][...] if n_mask else None
  all_k = slice(None)

  def query_block(i, carry):
    dk, dv, d_cols = carry
    start = pl.multiple_of(i * bq, bq)
    q_slice = pl.ds(start, bq)
    q, do = q_ref[q_slice, :], do_ref[q_slice, :]
    m, l, delta = m_ref[q_slice, :], l_ref[q_slice, :], delta_ref[q_slice, :]
    block = _BlockTerms(spec, qr_ref[q_slice, :], qc_ref[q_slice, :],
                        k_rows, k_cols)
    logits = block.logits(
        q, k, _term_values(spec, term_refs, q_slice, all_k), k_start,
        mask_row)
    p, d_logits = _weights_and_grads(
        spec, block, logits, m, 1.0 / l, do, v,
        [ref[q_slice, :] for ref in d_sum_refs], delta, mask_row)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do,
                      preferred_element_type=jnp.float32)
    dk = dk + jnp.dot(d_logits.astype(q.dtype).T, q,
                      preferred_element_type=jnp.float32)
    d_cols = [d + kl.scatter_cols(d_logits, block.slots(t.lookup, True),
                                  t.lookup.num_slots, width)
              for d, t in zip(d_cols, cols)]
    return dk, dv, d_cols

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
          [jnp.zeros((width, k.shape[0]), jnp.float32)] * len(cols))
  dk, dv, d_cols = jax.lax.fori_loop(
      0, spec.padded_length // bq, query_block, init)
  dk_ref[...], dv_ref[...] = dk, dv
  for ref, d in zip(d_col_refs, d_cols):
    ref[...] = d


class _Specs:
  """The BlockSpecs of the kernels' operands, for grid `(b, h, block)`."""

  def __init__(self, spec: _Spec):
    from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
    self._pl, self._spec = pl, spec

  def block(self, size, minor):
    """`(B, H, L, minor)` arrays, one block of `size` tokens."""
    return self._pl.BlockSpec((None, None, size, minor),
                              lambda b, h, i: (b, h, i, 0))

  def whole(self, minor):
    """`(B, H, L, minor)` arrays, the head's whole sequence."""
    length = self._spec.padded_length
    return self._pl.BlockSpec((None, None, length, minor),
                              lambda b, h, i: (b, h, 0, 0))

  def coords(self, query_side: bool, size: int):
    """`(L, 1)` query or `(1, L)` key coordinates, blocks of `size`."""
    whole = size == self._spec.padded_length
    if query_side:
      return self._pl.BlockSpec(
          (size, 1), lambda b, h, i: (0 if whole else i, 0))
    return self._pl.BlockSpec(
        (1, size), lambda b, h, i: (0, 0 if whole else i))

  def terms(self, q_size: int, k_size: int):
    pl, length, width = self._pl, self._spec.padded_length, \
        self._spec.slot_width
    out = []
    for term in self._spec.terms:
      if term.kind == 'rows':
        out.append(pl.BlockSpec((None, None, q_size, width),
                                (lambda b, h, i: (b, h, i, 0))
                                if q_size < length else
                                (lambda b, h, i: (b, h, 0, 0))))
      elif term.kind == 'cols':
        out.append(pl.BlockSpec((None, None, width, k_size),
                                (lambda b, h, i: (b, h, 0, i))
                                if k_size < length else
                                (lambda b, h, i: (b, h, 0, 0))))
      else:
        shared = term.table_heads == 1
        out.append(pl.BlockSpec(
            (None, 1, width),
            lambda b, h, i, shared=shared: (0 if shared else h, 0, 0)))
    return out

  def partial_bias(self):
    """`(B, H, blocks, 1, W)` partial bias gradients, one per program."""
    return self._pl.BlockSpec((None, None, None, 1, self._spec.slot_width),
                              lambda b, h, i: (b, h, i, 0, 0))

  def key_slots(self):
    """`(B, H, W, L)` per-key slot arrays, one key block."""
    return self._pl.BlockSpec(
        (None, None, self._spec.slot_width, self._spec.block_k),
        lambda b, h, i: (b, h, 0, i))

  def mask(self, k_size: int):
    if self._spec.mask_shape is None:
      return []
    mb, mh = self._spec.mask_shape
    whole = k_size == self._spec.padded_length
    return [self._pl.BlockSpec(
        (None, None, 1, k_size),
        lambda b, h, i: (b if mb > 1 else 0, h if mh > 1 else 0, 0,
                         0 if whole else i))]


def _coords(spec: _Spec, geometry: BucketGeometry):
  q_rows, q_cols = kl.token_coords(geometry, spec.padded_length, True)
  k_rows, k_cols = kl.token_coords(geometry, spec.padded_length, False)
  return (jnp.asarray(q_rows[:, None]), jnp.asarray(q_cols[:, None]),
          jnp.asarray(k_rows[None]), jnp.asarray(k_cols[None]))


def _geometry(spec: _Spec) -> BucketGeometry:
  return (spec.terms[0].lookup if spec.terms else spec.values[0]).geometry


def _forward(spec: _Spec, q, k, v, zs, mask):
  batch, heads, length, _ = q.shape
  dv = v.shape[-1]
  bq, width = spec.block_q, spec.slot_width
  s = _Specs(spec)
  mask_args = [] if mask is None else [mask]
  in_specs = ([s.block(bq, q.shape[-1]), s.whole(k.shape[-1]), s.whole(dv),
               s.coords(True, bq), s.coords(True, bq),
               s.coords(False, length), s.coords(False, length)]
              + s.terms(bq, length) + s.mask(length))
  f32 = jnp.float32
  out_shape = ([jax.ShapeDtypeStruct((batch, heads, length, dv), v.dtype),
                jax.ShapeDtypeStruct((batch, heads, length, 1), f32),
                jax.ShapeDtypeStruct((batch, heads, length, 1), f32)]
               + [jax.ShapeDtypeStruct((batch, heads, length, width), f32)
                  for _ in spec.values])
  out_specs = ([s.block(bq, dv), s.block(bq, 1), s.block(bq, 1)]
               + [s.block(bq, width) for _ in spec.values])
  outs = _pallas_call(
      spec, functools.partial(_forward_kernel, spec), 'irpe_attention_fwd',
      (batch, heads, length // bq), in_specs, out_specs, out_shape)(
          q, k, v, *_coords(spec, _geometry(spec)), *zs, *mask_args)
  return outs[0], outs[1:3], list(outs[3:])


def _backward(spec: _Spec, q, k, v, zs, mask, out, stats, sums, d_out,
              d_sums):
  batch, heads, length, dim = q.shape
  dv = v.shape[-1]
  bq, bk, width = spec.block_q, spec.block_k, spec.slot_width
  f32 = jnp.float32
  d_sums = [d.astype(f32) for d in d_sums]
  delta = jnp.einsum('bhid,bhid->bhi', d_out.astype(f32), out.astype(f32))
  for s_, ds in zip(sums, d_sums):
    delta = delta + jnp.einsum('bhit,bhit->bhi', s_, ds)
  delta = delta[..., None]
  d_out = d_out.astype(v.dtype)
  s = _Specs(spec)
  coords = _coords(spec, _geometry(spec))
  mask_args = [] if mask is None else [mask]
  n_blocks = length // bq

  dq_in = ([s.block(bq, dim), s.whole(dim), s.whole(dv),
            s.coords(True, bq), s.coords(True, bq), s.coords(False, length),
            s.coords(False, length)] + s.terms(bq, length) + s.mask(length)
           + [s.block(bq, dv)] + [s.block(bq, 1)] * 3
           + [s.block(bq, width) for _ in spec.values])
  rows, biases = spec.of_kind('rows'), spec.of_kind('bias')
  dq_out = ([s.block(bq, dim)] + [s.block(bq, width) for _ in rows]
            + [s.partial_bias() for _ in biases])
  dq_shape = ([jax.ShapeDtypeStruct((batch, heads, length, dim), f32)]
              + [jax.ShapeDtypeStruct((batch, heads, length, width), f32)
                 for _ in rows]
              + [jax.ShapeDtypeStruct((batch, heads, n_blocks, 1, width), f32)
                 for _ in biases])
  dq_outs = _pallas_call(
      spec, functools.partial(_dq_kernel, spec), 'irpe_attention_bwd_dq',
      (batch, heads, n_blocks), dq_in, dq_out, dq_shape)(
          q, k, v, *coords, *zs, *mask_args, d_out, *stats, delta, *d_sums)
  d_q, d_rows, d_bias_parts = (dq_outs[0], dq_outs[1:1 + len(rows)],
                               dq_outs[1 + len(rows):])

  cols = spec.of_kind('cols')
  dkv_in = ([s.whole(dim), s.block(bk, dim), s.block(bk, dv),
             s.coords(True, length), s.coords(True, length),
             s.coords(False, bk), s.coords(False, bk)]
            + s.terms(length, bk) + s.mask(bk)
            + [s.whole(dv)] + [s.whole(1)] * 3
            + [s.whole(width) for _ in spec.values])
  dkv_out = ([s.block(bk, dim), s.block(bk, dv)]
             + [s.key_slots() for _ in cols])
  dkv_shape = ([jax.ShapeDtypeStruct((batch, heads, length, dim), f32),
                jax.ShapeDtypeStruct((batch, heads, length, dv), f32)]
               + [jax.ShapeDtypeStruct((batch, heads, width, length), f32)
                  for _ in cols])
  dkv_outs = _pallas_call(
      spec, functools.partial(_dkv_kernel, spec), 'irpe_attention_bwd_dkv',
      (batch, heads, length // bk), dkv_in, dkv_out, dkv_shape)(
          q, k, v, *coords, *zs, *mask_args, d_out, *stats, delta, *d_sums)
  d_k, d_v, d_cols = dkv_outs[0], dkv_outs[1], dkv_outs[2:]

  rows_it, cols_it, bias_it = iter(d_rows), iter(d_cols), iter(d_bias_parts)
  d_zs = []
  for term, z in zip(spec.terms, zs):
    if term.kind == 'rows':
      d = next(rows_it)
    elif term.kind == 'cols':
      d = next(cols_it)
    else:
      d = next(bias_it).sum((0, 2, 3))  # (H, W)
      if term.table_heads == 1:
        d = d.sum(0, keepdims=True)
      d = d[:, None, :]
    d_zs.append(d.astype(z.dtype))
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_zs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec, q, k, v, zs, mask):
  out, _, sums = _forward(spec, q, k, v, zs, mask)
  return out, sums


def _fused_fwd(spec, q, k, v, zs, mask):
  out, stats, sums = _forward(spec, q, k, v, zs, mask)
  return (out, sums), (q, k, v, zs, mask, out, stats, sums)


def _fused_bwd(spec, residuals, cotangents):
  q, k, v, zs, mask, out, stats, sums = residuals
  d_out, d_sums = cotangents
  d_q, d_k, d_v, d_zs = _backward(spec, q, k, v, zs, mask, out, stats, sums,
                                  d_out, d_sums)
  return d_q, d_k, d_v, d_zs, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _pad_tokens(x, length, axis=2):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad)


def _by_slot(z, lookup: kl.KernelGeometry, width: int):
  """`(..., nb)` bucket values -> `(..., width)` slot values (zero past P)."""
  out = jnp.take(z, jnp.asarray(lookup.slot_buckets), axis=-1)
  return jnp.pad(out, [(0, 0)] * (z.ndim - 1) + [(0, width - out.shape[-1])])


def _by_bucket(s, lookup: kl.KernelGeometry):
  """Transpose of `_by_slot`: `(..., width)` -> `(..., nb)`."""
  g = lookup.geometry
  s = s[..., :lookup.num_slots]
  return jnp.zeros(s.shape[:-1] + (g.num_buckets,), s.dtype).at[
      ..., jnp.asarray(lookup.slot_buckets)].add(s)


def pallas_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    logit_terms: Sequence[blockwise.LogitTerm] = (),
    value_geometries: Sequence[BucketGeometry] = (),
    mask: Optional[jax.Array] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
  """`blockwise.blockwise_attention` as fused Pallas kernels.

  Same inputs (without dropout) and outputs; gradients to q, k, v and every
  term's `z` or bias table, by the kernels' own backward pass.

  Args:
    q: `(B, H, L, D)` queries, already scaled.
    k: `(B, H, L, D)` keys.
    v: `(B, H, L, Dv)` values.
    logit_terms: iRPE terms on the logits (`blockwise.LogitTerm`).
    value_geometries: geometries of the contextual v terms.
    mask: boolean key mask, broadcastable to `(B, H, 1, L)`, True = attend.
    block_q: queries per block (default `DEFAULT_BLOCK[backend]`).
    block_k: keys per block (likewise).
    backend: 'tpu', 'gpu' or 'interpret' (default `default_backend()`:
      the platform's kernels, or the interpreter on CPU). Pass 'tpu' or
      'gpu' to lower for that platform from another (`jax.export`).

  Returns:
    `(out, sums)`: `out (B, H, L, Dv)` in v's dtype and, per value
    geometry, the float32 `(B, H, L, nb)` bucket sums of the weights.

  Raises:
    ValueError: for an input `blockwise_attention` rejects, or a case the
      kernels do not take (`unsupported_reason`).
  """
  backend = default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}.')
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 (B, H, L, D), got shape '
                       f'{x.shape}.')
  batch, heads, length, dim = q.shape
  if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f'q {q.shape}, k {k.shape} and v {v.shape} must be '
                     f'(B, H, L, D), (B, H, L, D) and (B, H, L, Dv).')
  logit_terms = tuple(blockwise.LogitTerm(*t) for t in logit_terms)
  for i, term in enumerate(logit_terms):
    blockwise._check_term(i, term, batch, heads, length, length)  # pylint: disable=protected-access
  value_geometries = tuple(value_geometries)
  for i, g in enumerate(value_geometries):
    if not isinstance(g, BucketGeometry) or g.length != length:
      raise ValueError(f'value_geometries[{i}] must be a BucketGeometry of '
                       f'L = {length} tokens, got {g!r}.')
  if not logit_terms and not value_geometries:
    raise ValueError('pallas_attention needs at least one iRPE term; plain '
                     'attention has fused kernels of its own '
                     '(jax.nn.dot_product_attention).')
  _checks.check_mask(mask, (batch, heads, length, length))
  reason = unsupported_reason(q, v, logit_terms, value_geometries, mask,
                              backend=backend)
  if reason:
    raise ValueError(f'pallas_attention cannot take this attention: '
                     f'{reason}. Use blockwise.blockwise_attention.')
  block_q, block_k = _check_blocks(backend, block_q, block_k)
  padded = _round_up(length, math.lcm(block_q, block_k))
  lookups = [kl.kernel_geometry(t.geometry) for t in logit_terms]
  value_lookups = [kl.kernel_geometry(g) for g in value_geometries]
  slots = max(lk.num_slots for lk in lookups + value_lookups)
  width = (_round_up(slots, 128) if backend == 'tpu'
           else _next_power_of_2(slots))
  terms, zs = [], []
  for lookup, term in zip(lookups, logit_terms):
    z = _by_slot(term.z, lookup, width)
    if term.z.ndim == 2:
      terms.append(_Term(lookup, term.transposed, 'bias', z.shape[0]))
      zs.append(z[:, None, :])
    elif term.transposed:
      terms.append(_Term(lookup, True, 'cols'))
      zs.append(jnp.swapaxes(_pad_tokens(z, padded), 2, 3))
    else:
      terms.append(_Term(lookup, False, 'rows'))
      zs.append(_pad_tokens(z, padded))
  mask_shape = None
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:3] + (length,))
    mask = _pad_tokens(mask.astype(jnp.int32), padded, axis=3)
    mask_shape = mask.shape[:2]
  spec = _Spec(backend=backend, block_q=block_q, block_k=block_k,
               length=length, padded_length=padded,
               height=(lookups + value_lookups)[0].geometry.height,
               slot_width=width, terms=tuple(terms),
               values=tuple(value_lookups), mask_shape=mask_shape)
  out, sums = _fused(spec, *(_pad_tokens(x, padded) for x in (q, k, v)), zs,
                     mask)
  return out[:, :, :length], tuple(
      _by_bucket(s_[:, :, :length], lookup)
      for s_, lookup in zip(sums, value_lookups))
