"""Multi-head self-attention with iRPE on q, k and/or v, as pure functions.

`attention_with_rpe` is the release's `RPEAttention.forward` (its
`rpe_vision_transformer.py`) on per-head arrays, framework-free: the Linen
and NNX `IRPEAttention` modules both call it with their projections, iRPE
modules, dropout and a hook that records the attention weights.

Two implementations compute it (`attention_impl`):

- 'materialized': the release's computation, with the `(B, H, L, L)`
  logits, encodings and weights formed (and kept by autodiff).
- 'blockwise': flash attention in blocks with the iRPE terms computed
  inside each block (`irpe_jax.blockwise`): `O(L)` memory per head.
- 'pallas': the blockwise computation as fused Pallas kernels for GPU and
  TPU (`irpe_jax.kernels`); on CPU they run in Pallas's
  interpreter (slow; for tests).
- 'auto': 'blockwise' from `AUTO_BLOCKWISE_MIN_LENGTH` tokens on, else
  'materialized' (see `resolve_attention_impl`); 'pallas' instead of
  'blockwise' on the platforms of `AUTO_PALLAS_PLATFORMS`, where the
  kernels take the case.
"""

from typing import Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from irpe_jax import _checks
from irpe_jax import blockwise
from irpe_jax import kernels
from irpe_jax import ops

ATTENTION_IMPLS = ('auto', 'materialized', 'blockwise', 'pallas')
# Where 'auto' switches to blockwise attention, in tokens, per platform
# (`jax.default_backend()` when the call is traced). On CPU, measured with
# `python -m experiments.benchmarks.bench_flash` (B = 1, H = 8, D = 32,
# forward and backward, a shared 2-core CPU, jax 0.12): by median time,
# blockwise takes 1.25x (iRPE-K) and 1.03x (iRPE-QKV) the materialised time
# at L = 1025, and 0.98x and 0.81x at 4097; at 16385 only blockwise runs
# (the materialised path would need over 24 GB). From 4096 tokens 'auto'
# takes blockwise: as fast or faster, with 1/50 (K) and 1/48 (QKV) of the
# temporaries (29 against 1551 MiB for iRPE-K). DeiT-S (L = 197) stays
# materialised, as fast as before. Below 4096 the materialised path's
# memory still grows as L^2: pass attention_impl='blockwise' where memory,
# not speed, is the limit.
# On GPU and TPU, reasoned until measured (part 2 of the work adds fused
# kernels there): the materialised path runs as a few large fused XLA ops,
# fast while its (B, H, L, L) arrays fit, and a loop of small blocks pays a
# launch per block; from 4096 tokens one (B, H, L, L) float32 array is
# 64 MiB per head and image, and memory is what limits a model.
AUTO_BLOCKWISE_MIN_LENGTH: Mapping[str, int] = {'cpu': 4096}
AUTO_BLOCKWISE_MIN_LENGTH_DEFAULT = 4096
# Where 'auto' takes the Pallas kernels for 'blockwise'. None yet, reasoned
# until a device has run them: from this project's CPU, `jax.export` checks
# that the kernels lower to Mosaic and to Triton (tests/test_pallas.py),
# but not that the TPU and GPU compilers accept what they lowered, nor how
# fast it runs (scripts/accelerator_check.sh measures both). A platform goes
# here once that script has run there and the kernels beat 'blockwise'.
# Under 'auto' the cases the kernels do not take
# (`kernels.unsupported_reason`: dropout, masks over queries, ...)
# stay blockwise.
AUTO_PALLAS_PLATFORMS: frozenset = frozenset()

# `(x, height, width) -> encoding`, as the IRPE modules are called; rpe_q is
# also passed `x_tokens_last=True` and `scale` (see `attention_with_rpe`).
RPEFn = Callable[..., jax.Array]


def _row_major(x: jax.Array) -> jax.Array:
  """`x (B, H, L, D)` materialised once, row-major, for all its consumers.

  q and k arrive as a view of the qkv projection's `(B, L, H, D)` output.
  Left to XLA CPU, each consumer (the logits matmul, the iRPE table matmul,
  the backward matmuls) gets its own transposing copy, or the product with
  the scale is recomputed into each. A barrier on the 2-D `(B * H * L, D)`
  reshape, which cannot be a bitcast of the transposed layout, leaves one
  row-major copy that all of them read (one DeiT-S layer, forward and
  backward, side by side on CPU: plain 2-3.5% faster).
  """
  rows = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]))
  return rows.reshape(x.shape)


def check_mask(mask: Optional[jax.Array], batch: int, num_heads: int,
               length: int) -> None:
  """Raises unless `mask` is boolean and broadcastable to `(B, H, L, L)`."""
  _checks.check_mask(mask, (batch, num_heads, length, length))


def resolve_attention_impl(attention_impl: str, length: int,
                           platform: Optional[str] = None) -> str:
  """'materialized' or 'blockwise': what `attention_impl` runs for `length`.

  Args:
    attention_impl: one of `ATTENTION_IMPLS`.
    length: `L`, the number of keys.
    platform: 'cpu', 'gpu', 'tpu', ...; default `jax.default_backend()`.
      'auto' is decided when the call is traced: a function exported for
      another platform keeps the choice of the tracing one, so pass an
      explicit impl there.

  Returns:
    `attention_impl` itself, or for 'auto' 'blockwise' from
    `AUTO_BLOCKWISE_MIN_LENGTH[platform]` tokens on (default
    `AUTO_BLOCKWISE_MIN_LENGTH_DEFAULT`), else 'materialized'.
  """
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f'Unknown attention_impl {attention_impl!r}; expected '
                     f'one of {ATTENTION_IMPLS}.')
  if attention_impl != 'auto':
    return attention_impl
  platform = jax.default_backend() if platform is None else platform
  threshold = AUTO_BLOCKWISE_MIN_LENGTH.get(
      platform, AUTO_BLOCKWISE_MIN_LENGTH_DEFAULT)
  return 'blockwise' if length >= threshold else 'materialized'


def attention_with_rpe(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       scale: float,
                       rpe_q: Optional[RPEFn] = None,
                       rpe_k: Optional[RPEFn] = None,
                       rpe_v: Optional[RPEFn] = None,
                       mask: Optional[jax.Array] = None,
                       dropout: Optional[
                           Callable[[jax.Array], jax.Array]] = None,
                       height: Optional[int] = None,
                       width: Optional[int] = None,
                       weights_hook: Optional[
                           Callable[[jax.Array], None]] = None,
                       attention_impl: str = 'auto',
                       block_q: Optional[int] = None,
                       block_k: Optional[int] = None,
                       dropout_rate: float = 0.0,
                       dropout_rng: Optional[jax.Array] = None
                       ) -> jax.Array:
  """The release's RPEAttention core on per-head arrays.

  Args:
    q: `(B, H, Lq, D)` queries, unscaled.
    k: `(B, H, Lk, D)` keys (`Lk = Lq` with iRPE).
    v: `(B, H, Lk, D)` values.
    scale: query scale, usually `D ** -0.5`.
    rpe_q: encoding of the scaled keys, added transposed to the logits;
      called as `rpe_q(k, height, width, x_tokens_last=True, scale=scale)`
      so that the lookup returns the encoding of `k * scale` with the keys
      on the last axis (as the IRPE modules do), without a pass over k or
      over `(B, H, L, L)`.
    rpe_k: encoding of queries, added to the logits.
    rpe_v: encoding of the attention weights, added to the output.
    mask: boolean, broadcastable to `(B, H, Lq, Lk)`, True = attend; applied
      after the iRPE terms. Masked logits become the lowest float32, so a
      query whose every key is masked attends uniformly to all keys (the
      release's `-inf` gives NaN there).
    dropout: applied to the attention weights ('materialized' only).
    height: rows of the token grid (static).
    width: columns of the token grid (static).
    weights_hook: called with the `(B, H, L, L)` attention weights before
      dropout (for example to `sow` them for visualisation); only the
      materialised path forms them, 'blockwise' does not call it.
    attention_impl: 'materialized', 'blockwise', 'pallas' or 'auto' (see
      `resolve_attention_impl`). 'blockwise' needs the rpe modules of this
      library (it calls them with `as_term=True` for their tables and
      geometries instead of their encodings), and takes dropout as
      `dropout_rate` and `dropout_rng` rather than a `dropout` function;
      'auto' stays materialised where either is missing.
    block_q: queries per block of 'blockwise' (default
      `blockwise.DEFAULT_BLOCK_Q`).
    block_k: keys per block of 'blockwise' (default
      `blockwise.DEFAULT_BLOCK_K`).
    dropout_rate: attention dropout of 'blockwise', with `dropout_rng`.
    dropout_rng: PRNG key of the blockwise dropout; each block's mask is
      drawn from it, the block's indices folded in.

  Returns:
    `(B, H, Lq, D)` attention output, before the heads are merged.
  """
  rpes = {'rpe_q': rpe_q, 'rpe_k': rpe_k, 'rpe_v': rpe_v}
  impl = resolve_attention_impl(attention_impl, k.shape[2])
  if attention_impl == 'auto' and impl == 'blockwise' and (
      (dropout is not None and not dropout_rate)
      or not all(fn is None or getattr(fn, 'returns_terms', False)
                 for fn in rpes.values())):
    impl = 'materialized'
  if impl in ('blockwise', 'pallas'):
    if dropout is not None and (impl == 'pallas' or not dropout_rate):
      raise TypeError(_NO_DROPOUT_FUNCTION[impl])
    # 'auto' may take the kernels (AUTO_PALLAS_PLATFORMS); 'blockwise' never.
    use_kernels = True if impl == 'pallas' else (
        None if attention_impl == 'auto' else False)
    return _blockwise(q, k, v, scale=scale, rpes=rpes, mask=mask,
                      height=height, width=width, block_q=block_q,
                      block_k=block_k, dropout_rate=dropout_rate,
                      dropout_rng=dropout_rng, use_kernels=use_kernels)
  return _materialized(q, k, v, scale=scale, mask=mask, dropout=dropout,
                       height=height, width=width, weights_hook=weights_hook,
                       **rpes)


_NO_DROPOUT_FUNCTION = {
    'blockwise': ("attention_impl='blockwise' cannot apply a dropout "
                  'function to weights it never forms; pass dropout_rate= '
                  'and dropout_rng= instead.'),
    'pallas': ("attention_impl='pallas' takes no dropout; its kernels have "
               "none (use attention_impl='blockwise')."),
}


def _materialized(q, k, v, *, scale, rpe_q, rpe_k, rpe_v, mask, dropout,
                  height, width, weights_hook):
  """`attention_with_rpe` with the `(B, H, L, L)` arrays formed."""
  dtype = q.dtype
  q = _row_major(q * jnp.asarray(scale, dtype))
  if rpe_q is not None:
    k = _row_major(k)
  logits = jnp.einsum('bhid,bhjd->bhij', q, k)
  encodings = []
  if rpe_k is not None:
    encodings.append(rpe_k(q, height, width))
  if rpe_q is not None:
    # The release encodes `k * scale`; with `scale=` the lookup scales its
    # table instead, so no scaled copy of k is made or kept for the backward
    # pass (DeiT-S iRPE-QKV training step: peak memory 2251 -> 2196 MiB).
    encodings.append(rpe_q(k, height, width, x_tokens_last=True,
                           scale=scale))
  if encodings:
    # Summed before they meet the logits: XLA then fuses both gathers into
    # the add instead of running each as a standalone transposing gather.
    logits = logits + sum(encodings[1:], encodings[0])
  logits = logits.astype(jnp.float32)  # softmax in fp32 even under bf16.
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if weights_hook is not None:
    weights_hook(weights)
  if dropout is not None:
    weights = dropout(weights)
  out = jnp.einsum('bhij,bhjd->bhid', weights, v)
  if rpe_v is not None:
    out = out + rpe_v(weights, height, width)
  return out


def _terms(name: str, rpe: RPEFn, x: jax.Array, height, width, **kwargs
           ) -> Sequence:
  """The `core.RPETerm`s of one rpe module (two for 'cross')."""
  if not getattr(rpe, 'returns_terms', False):
    raise TypeError(f"attention_impl='blockwise' needs {name} to be an "
                    f'irpe_jax IRPE or IRPECross module (Linen or NNX), '
                    f'which returns its tables for the blocks; got '
                    f'{type(rpe).__name__}.')
  return rpe(x, height, width, as_term=True, **kwargs)


def _blockwise(q, k, v, *, scale, rpes, mask, height, width, block_q,
               block_k, dropout_rate, dropout_rng, use_kernels):
  """`attention_with_rpe` by `blockwise.blockwise_attention`, or by
  `kernels.pallas_attention`: with `use_kernels=True`, or, with
  `use_kernels=None`, on `AUTO_PALLAS_PLATFORMS` where they take the case."""
  dtype = q.dtype
  q = q * jnp.asarray(scale, dtype)
  logit_terms = []
  if rpes['rpe_k'] is not None:
    logit_terms += [blockwise.LogitTerm(t.values, t.geometry, False)
                    for t in _terms('rpe_k', rpes['rpe_k'], q, height, width)]
  if rpes['rpe_q'] is not None:
    logit_terms += [blockwise.LogitTerm(t.values, t.geometry, True)
                    for t in _terms('rpe_q', rpes['rpe_q'], k, height, width,
                                    scale=scale)]
  value_terms = ()
  if rpes['rpe_v'] is not None:
    value_terms = _terms('rpe_v', rpes['rpe_v'], v, height, width)
  value_geometries = [t.geometry for t in value_terms]
  if use_kernels is None and jax.default_backend() in AUTO_PALLAS_PLATFORMS:
    use_kernels = kernels.unsupported_reason(
        q, v, logit_terms, value_geometries, mask, dropout_rate) is None
  if use_kernels:
    if dropout_rate:
      raise ValueError(f"attention_impl='pallas' takes no dropout, got "
                       f"dropout_rate={dropout_rate}; its kernels have "
                       f"none (use attention_impl='blockwise').")
    out, sums = kernels.pallas_attention(
        q, k, v, logit_terms=logit_terms, value_geometries=value_geometries,
        mask=mask, block_q=block_q, block_k=block_k)
  else:
    out, sums = blockwise.blockwise_attention(
        q, k, v, logit_terms=logit_terms, value_geometries=value_geometries,
        mask=mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        block_q=block_q, block_k=block_k)
  for s, term in zip(sums, value_terms):
    out = out + ops.head_matmul(s.astype(dtype), term.values)
  return out


def check_inputs(inputs_q: jax.Array, inputs_k: Optional[jax.Array],
                 inputs_v: Optional[jax.Array], num_heads: int
                 ) -> Tuple[jax.Array, jax.Array, int]:
  """Checks the `(B, N, C)` inputs of self-attention; k and v default to q.

  Returns:
    `(inputs_k, inputs_v, head_dim)`.
  """
  num_heads = _checks.check_int('num_heads', num_heads, 1)
  inputs_k = inputs_q if inputs_k is None else inputs_k
  inputs_v = inputs_k if inputs_v is None else inputs_v
  for name, x in (('inputs_q', inputs_q), ('inputs_k', inputs_k),
                  ('inputs_v', inputs_v)):
    if x.ndim != 3:
      raise ValueError(f'{name} must have rank 3 (B, N, C), got shape '
                       f'{x.shape}.')
    if x.shape != inputs_q.shape:
      raise ValueError(f'{name} has shape {x.shape}; iRPE self-attention '
                       f'needs all inputs of the shape of inputs_q, '
                       f'{inputs_q.shape}.')
  features = inputs_q.shape[-1]
  if features % num_heads:
    raise ValueError(f'The feature size {features} is not divisible by '
                     f'num_heads={num_heads}.')
  return inputs_k, inputs_v, features // num_heads


def split_qkv(kernel: jax.Array, bias: Optional[jax.Array],
              inputs_q: jax.Array, inputs_k: jax.Array, inputs_v: jax.Array,
              num_heads: int, dtype) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Projects to per-head `(B, H, N, D)` q, k, v with one `(C, 3C)` kernel.

  The kernel is the release's `qkv` Linear (`weight.T`), q's third first.
  Self-attention takes one matmul; distinct inputs (DETR's q = k = src + pos,
  v = src) use the matching third of the kernel each.
  """
  batch, length, features = inputs_q.shape
  head_dim = features // num_heads
  kernel = kernel.astype(dtype)
  bias = None if bias is None else bias.astype(dtype)

  def project(x, first, count):
    """Heads of thirds `first .. first + count` of the kernel."""
    cols = slice(first * features, (first + count) * features)
    y = jnp.dot(x.astype(dtype), kernel[:, cols])
    if bias is not None:
      y = y + bias[cols]
    y = y.reshape(batch, length, count, num_heads, head_dim)
    return [y[:, :, i] for i in range(count)]

  if inputs_k is inputs_q and inputs_v is inputs_q:
    q, k, v = project(inputs_q, 0, 3)
  elif inputs_k is inputs_q:
    (q, k), (v,) = project(inputs_q, 0, 2), project(inputs_v, 2, 1)
  else:
    (q,), (k,), (v,) = (project(x, i, 1)
                        for i, x in enumerate((inputs_q, inputs_k, inputs_v)))
  return tuple(jnp.swapaxes(t, 1, 2) for t in (q, k, v))


def merge_heads(out: jax.Array) -> jax.Array:
  """`(B, H, N, D)` -> `(B, N, H * D)`, the layout of the output projection."""
  batch, num_heads, length, head_dim = out.shape
  return jnp.swapaxes(out, 1, 2).reshape(batch, length, num_heads * head_dim)
