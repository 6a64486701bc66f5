"""Multi-head self-attention with iRPE on q, k and/or v, as pure functions.

`attention_with_rpe` is the release's `RPEAttention.forward` (its
`rpe_vision_transformer.py`) on per-head arrays, framework-free: the Linen
and NNX `IRPEAttention` modules both call it with their projections, iRPE
modules, dropout and a hook that records the attention weights.
"""

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from irpe_jax import _checks

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
  if mask is None:
    return
  if mask.dtype != jnp.bool_:
    raise TypeError(f'mask must be boolean (True = attend), got dtype '
                    f'{mask.dtype}.')
  target = (batch, num_heads, length, length)
  if mask.ndim != 4 or any(m not in (1, t) for m, t in zip(mask.shape, target)):
    raise ValueError(f'mask of shape {mask.shape} does not broadcast to '
                     f'(B, H, L, L) = {target}; for key padding pass '
                     f'mask[:, None, None, :].')


def attention_with_rpe(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       scale: float,
                       rpe_q: Optional[RPEFn] = None,
                       rpe_k: Optional[RPEFn] = None,
                       rpe_v: Optional[RPEFn] = None,
                       mask: Optional[jax.Array] = None,
                       dropout: Optional[Callable[[jax.Array], jax.Array]] = None,
                       height: Optional[int] = None,
                       width: Optional[int] = None,
                       weights_hook: Optional[Callable[[jax.Array], None]] = None
                       ) -> jax.Array:
  """The release's RPEAttention core on per-head arrays.

  Args:
    q: `(B, H, L, D)` queries, unscaled.
    k: `(B, H, L, D)` keys.
    v: `(B, H, L, D)` values.
    scale: query scale, usually `D ** -0.5`.
    rpe_q: encoding of the scaled keys, added transposed to the logits;
      called as `rpe_q(k, height, width, x_tokens_last=True, scale=scale)`
      so that the lookup returns the encoding of `k * scale` with the keys
      on the last axis (as the IRPE modules do), without a pass over k or
      over `(B, H, L, L)`.
    rpe_k: encoding of queries, added to the logits.
    rpe_v: encoding of the attention weights, added to the output.
    mask: boolean, broadcastable to `(B, H, L, L)`, True = attend; applied
      after the iRPE terms. Masked logits become the lowest float32, so a
      query whose every key is masked attends uniformly to all keys (the
      release's `-inf` gives NaN there).
    dropout: applied to the attention weights.
    height: rows of the token grid (static).
    width: columns of the token grid (static).
    weights_hook: called with the `(B, H, L, L)` attention weights before
      dropout (for example to `sow` them for visualisation).

  Returns:
    `(B, H, L, D)` attention output, before the heads are merged.
  """
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
