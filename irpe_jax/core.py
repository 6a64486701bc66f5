"""The iRPE of one table as a pure function of its input and table.

Shared by the Linen and NNX modules, which only hold the tables. This is
where input shapes are checked (at trace time) and the bucket ids are
resolved for the token grid of the call.
"""

import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from irpe_jax import _checks
from irpe_jax import buckets
from irpe_jax import ops
from irpe_jax.config import SingleRPEConfig


def resolve_grid(length: int, height: Optional[int], width: Optional[int],
                 skip: Optional[int] = None) -> Tuple[int, int, int]:
  """`(height, width, skip)` of a sequence of `length` tokens.

  Args:
    length: `L`, the number of tokens.
    height: rows of the token grid; None (with `width` None) for a square
      grid of side `floor(sqrt(L))`, as the release takes.
    width: columns of the token grid.
    skip: the leading non-spatial tokens the table was configured for, or
      None to take `L - height * width` (the release's rule). Given, `L`
      must be `skip + height * width`: the release would silently run
      another grid (1 + 12 x 16 tokens on 13 x 13 with 24 extra "skip"
      tokens), or count grid tokens as skip tokens (17 tokens on a 3 x 4
      grid with 5 "skip" tokens), so this raises instead; with the default
      square grid the message asks for `height` and `width`.

  Returns:
    `(height, width, L - height * width)`.

  Raises:
    ValueError: if `L < height * width`, or `L != skip + height * width`
      for a given `skip`.
  """
  length = _checks.check_int('L', length, 1)
  if (height is None) != (width is None):
    raise ValueError(f'Give both height and width or neither; got '
                     f'height={height}, width={width}.')
  if height is None:
    side = math.isqrt(length)
    if skip is not None and length - side * side != skip:
      raise ValueError(
          f'The sequence has L={length} tokens, which is not skip + a square '
          f'grid for the configured skip={skip} (floor(sqrt(L))={side} '
          f'leaves {length - side * side} non-grid tokens); pass height= '
          f'and width= of the token grid, with L = skip + height*width.')
    height = width = side
  height = _checks.check_int('height', height, 1)
  width = _checks.check_int('width', width, 1)
  grid_skip = length - height * width
  if grid_skip < 0:
    raise ValueError(f'The sequence has L={length} tokens, fewer than '
                     f'height*width = {height}*{width} = {height * width}; '
                     f'L must equal skip + height*width.')
  if skip is not None and grid_skip != skip:
    raise ValueError(
        f'The sequence has L={length} tokens, but height={height}, '
        f'width={width} and the configured skip={skip} need L = skip + '
        f'height*width = {skip + height * width} (L={length} would leave '
        f'{grid_skip} leading non-grid tokens); pass the token grid of the '
        f'input, or a config whose skip is the number of leading non-grid '
        f'tokens.')
  return height, width, grid_skip


def bucket_ids_for(config: SingleRPEConfig, method: str, num_buckets: int,
                   length: int, height: Optional[int],
                   width: Optional[int]) -> buckets.BucketGeometry:
  """The bucket geometry of one table for a sequence; checks `num_buckets`."""
  height, width, skip = resolve_grid(length, height, width, config.skip)
  geometry = buckets.get_bucket_geometry(
      method, height, width, skip, config.alpha, config.beta, config.gamma,
      index_fn=config.index_fn)
  got = geometry.num_buckets
  if got != num_buckets:
    base = buckets.num_buckets_without_skip(method, config.beta)
    fits = 'skip=0' if num_buckets == base else (
        'skip>=1' if num_buckets == base + 1 else 'no skip at all')
    raise ValueError(
        f'The table has {num_buckets} buckets, but the input (L={length}, '
        f'height={height}, width={width}) has skip={skip} and needs {got}; '
        f'a {num_buckets}-bucket table fits {fits}.')
  return geometry


def rpe_lookup(x: jax.Array, table: jax.Array, *, config: SingleRPEConfig,
               method: str, for_qk: bool, mode: Optional[str] = None,
               height: Optional[int] = None, width: Optional[int] = None,
               impl: str = 'auto', x_tokens_last: bool = False,
               scale: Optional[float] = None) -> jax.Array:
  """The encoding of one iRPE table (one half of 'cross').

  Args:
    x: `(B, H, L, D)` queries or keys for a q/k table (`for_qk=True`), the
      `(B, H, L, L)` attention weights for a v table.
    table: `(Ht, nb)` bias, `(Ht, D, nb)` contextual q/k, `(Ht, nb, D)` v.
    config: the module's config (alpha, beta, gamma, skip, index_fn).
    method: the table's method: 'euc', 'quant', 'product', 'cross_rows' or
      'cross_cols'.
    for_qk: True for a table on q or k, False for one on v (the release's
      `transposed`).
    mode: 'bias' or 'contextual'; default `config.mode`.
    height: rows of the token grid (static); default `floor(sqrt(L))`.
    width: columns of the token grid (static); default `floor(sqrt(L))`.
    impl: see `irpe_jax.ops`.
    x_tokens_last: q/k only. The encoding `e[b, h, i, j]` pairs token `i`
      of `x` with token `j`; True returns it with the tokens of `x` on the
      last axis, `e[b, h, j, i]`. rpe_q encodes the keys so, ready to add
      to the `(query, key)` logits; the lookup writes this layout directly,
      with no transpose pass over `(B, H, L, L)`.
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
  length = x.shape[2]
  if x_tokens_last and not for_qk:
    raise ValueError('x_tokens_last=True needs a q/k table (for_qk=True); '
                     'the v encoding (B, H, L, D) has no (L, L) axes.')
  if not for_qk and x.shape[3] != length:
    raise ValueError(f'rpe on v takes attention weights (B, H, L, L), got '
                     f'shape {x.shape}.')
  ids = _geometry_of_table(x, table, config, method, for_qk, height, width)
  if (config.mode if mode is None else mode) == 'bias':
    return ops.bias_encoding(table, ids, impl, x_tokens_last).astype(x.dtype)
  table = _scaled(table, scale, x)
  if for_qk:
    _check_head_dim(x, table)
    return ops.contextual_qk_encoding(x, table, ids, impl, x_tokens_last)
  return ops.contextual_v_encoding(x, table, ids, impl)


def _geometry_of_table(x, table, config, method, for_qk, height, width
                       ) -> buckets.BucketGeometry:
  """Checks the table's heads against `x (B, H, L, .)`; its geometry."""
  num_heads, length = x.shape[1], x.shape[2]
  if table.shape[0] not in (1, num_heads):
    raise ValueError(f'The table has {table.shape[0]} heads; the input has '
                     f'{num_heads} (expected 1 for a shared table or '
                     f'{num_heads}).')
  num_buckets = table.shape[-1 if for_qk else 1]
  return bucket_ids_for(config, method, num_buckets, length, height, width)


def _scaled(table, scale, x):
  """The contextual table times `scale` (None: as is), in its own dtype.

  The lookup computes in x's dtype and accumulates the table's gradient in
  float32 (see `irpe_jax.ops`).
  """
  if scale is None:
    return table
  return table * jnp.asarray(scale, jnp.promote_types(table.dtype, x.dtype))


def _check_head_dim(x, table):
  if table.shape[1] != x.shape[3]:
    raise ValueError(f'head_dim of the input is {x.shape[3]}, the table '
                     f'expects {table.shape[1]}.')


class RPETerm(NamedTuple):
  """One iRPE table, ready for blockwise attention (`irpe_jax.blockwise`).

  Attributes:
    values: contextual q/k, `z = x @ table`, `(B, H, L, nb)`; bias q/k, the
      `(Ht, nb)` table; contextual v, the `(Ht, nb, D)` table.
    geometry: the table's bucket geometry for the call's token grid.
    for_qk: True for a table on q or k, False for one on v.
  """
  values: jax.Array
  geometry: buckets.BucketGeometry
  for_qk: bool


def rpe_term(x: jax.Array, table: jax.Array, *, config: SingleRPEConfig,
             method: str, for_qk: bool, mode: Optional[str] = None,
             height: Optional[int] = None, width: Optional[int] = None,
             scale: Optional[float] = None) -> RPETerm:
  """What blockwise attention needs of one table, instead of its encoding.

  Takes the arguments of `rpe_lookup`, with one difference: for a v table
  `x` is the `(B, H, L, D)` values (their shape and dtype), since blockwise
  attention never forms the `(B, H, L, L)` weights. The same checks run;
  the bucket geometry is resolved but its `(L, L)` ids are never built.

  Returns:
    An `RPETerm`: for contextual q/k the `(B, H, L, nb)` product of
    `x * scale` and the table (computed here, in x's dtype, the table's
    gradient accumulated in float32 as `rpe_lookup` does).
  """
  if x.ndim != 4:
    raise ValueError(f'x must have rank 4 (B, H, L, D), got shape '
                     f'{x.shape}.')
  geometry = _geometry_of_table(x, table, config, method, for_qk, height,
                                width)
  if not for_qk:
    if table.shape[2] != x.shape[3]:
      raise ValueError(f'head_dim of the values is {x.shape[3]}, the v '
                       f'table expects {table.shape[2]}.')
    return RPETerm(table, geometry, False)
  if (config.mode if mode is None else mode) == 'bias':
    return RPETerm(table, geometry, True)
  _check_head_dim(x, table)
  return RPETerm(ops.head_matmul(x, _scaled(table, scale, x)), geometry,
                 True)
