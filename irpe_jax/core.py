"""The iRPE of one module as a function of its input and table.

Shared by the Linen and NNX front-ends: they only hold the tables. This is
where input shapes are checked (at trace time) and bucket ids are resolved for
the token grid of the call.
"""

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import buckets
from irpe_jax import ops
from irpe_jax.config import SingleRPEConfig


def resolve_grid(length: int, height: Optional[int],
                 width: Optional[int]) -> Tuple[int, int, int]:
  """`(height, width, skip)` of a sequence of `length` tokens.

  Without `height`/`width`, takes `floor(sqrt(L))` for both, as the release.
  """
  if (height is None) != (width is None):
    raise ValueError(f'Give both height and width or neither; got '
                     f'height={height}, width={width}.')
  if height is None:
    height = width = math.isqrt(length)
  for name, value in (('height', height), ('width', width)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f'{name} must be a static int, got {value!r}.')
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}.')
  skip = length - height * width
  if skip < 0:
    raise ValueError(f'The sequence has L={length} tokens, fewer than '
                     f'height*width = {height}*{width} = {height * width}; '
                     f'L must equal skip + height*width.')
  return int(height), int(width), int(skip)


def bucket_ids_for(config: SingleRPEConfig, method: str, num_buckets: int,
                   length: int, height: Optional[int],
                   width: Optional[int]) -> np.ndarray:
  """Bucket ids of one table for a sequence, checked against `num_buckets`."""
  height, width, skip = resolve_grid(length, height, width)
  ids, got = buckets.get_bucket_ids_2d(
      method, height, width, skip, config.alpha, config.beta, config.gamma,
      index_fn=config.index_fn)
  if got != num_buckets:
    base = buckets.num_buckets_without_skip(method, config.beta)
    fits = 'skip=0' if num_buckets == base else (
        'skip>=1' if num_buckets == base + 1 else 'no skip at all')
    raise ValueError(
        f'The table has {num_buckets} buckets, but the input (L={length}, '
        f'height={height}, width={width}) has skip={skip} and needs {got}; '
        f'a {num_buckets}-bucket table fits {fits}.')
  return ids


def rpe_lookup(x: jax.Array, table: jax.Array, *, config: SingleRPEConfig,
               method: str, transposed: bool, height: Optional[int] = None,
               width: Optional[int] = None, impl: str = 'auto',
               transpose_output: bool = False,
               scale: Optional[float] = None) -> jax.Array:
  """The encoding of one iRPE table (one half of 'cross').

  Args:
    x: `(B, H, L, D)` for q/k (`transposed=True`), `(B, H, L, L)` attention
      weights for v.
    table: `(Ht, nb)` bias, `(Ht, D, nb)` contextual q/k, `(Ht, nb, D)` v.
    config: the module's config (alpha, beta, gamma, mode, index_fn).
    method: the table's method: 'euc', 'quant', 'product', 'cross_rows' or
      'cross_cols'.
    transposed: True on q/k, False on v.
    height: rows of the token grid (static); default `floor(sqrt(L))`.
    width: columns of the token grid (static); default `floor(sqrt(L))`.
    impl: see `irpe_jax.ops`.
    transpose_output: q/k only: return the encoding with its last two axes
      swapped, as rpe_q adds it to the logits, computed without a transpose
      pass over `(B, H, L, L)`.
    scale: encode `x * scale` instead of `x`. The contextual lookups are
      linear in `x`, so the scale goes on the table (a `(D, nb)` multiply
      instead of a pass over `x`, and no scaled copy of `x` kept for the
      backward pass); bias encodings do not depend on `x` and ignore it.

  Returns:
    `(1, Ht, L, L)` for bias, `(B, H, L, L)` for contextual q/k,
    `(B, H, L, D)` for v.
  """
  if x.ndim != 4:
    raise ValueError(f'x must have rank 4 (B, H, L, D) or (B, H, L, L), got '
                     f'shape {x.shape}.')
  num_heads, length = x.shape[1], x.shape[2]
  if transpose_output and not transposed:
    raise ValueError('transpose_output=True needs transposed=True (q/k); the '
                     'v encoding (B, H, L, D) has no (L, L) axes to swap.')
  if not transposed and x.shape[3] != length:
    raise ValueError(f'rpe on v takes attention weights (B, H, L, L), got '
                     f'shape {x.shape}.')
  if table.shape[0] not in (1, num_heads):
    raise ValueError(f'The table has {table.shape[0]} heads; the input has '
                     f'{num_heads} (expected 1 for a shared table or '
                     f'{num_heads}).')
  num_buckets = table.shape[-1 if transposed else 1]
  ids = bucket_ids_for(config, method, num_buckets, length, height, width)
  if config.mode == 'bias':
    return ops.bias_encoding(table, ids, impl,
                             transpose_output).astype(x.dtype)
  table = table.astype(x.dtype)
  if scale is not None:
    table = table * jnp.asarray(scale, x.dtype)
  if transposed:
    if table.shape[1] != x.shape[3]:
      raise ValueError(f'head_dim of the input is {x.shape[3]}, the table '
                       f'expects {table.shape[1]}.')
    return ops.contextual_qk_encoding(x, table, ids, impl, transpose_output)
  return ops.contextual_v_encoding(x, table, ids, impl)

