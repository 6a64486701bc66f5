"""Flax Linen modules holding iRPE lookup tables.

The parameter names and layouts are the release's, so converted PyTorch
weights drop in: `lookup_table_bias (Ht, nb)`, `lookup_table_weight
(Ht, D, nb)` on q/k and `(Ht, nb, D)` on v; `IRPECross` nests them under
`rp_rows` and `rp_cols`.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from irpe_jax import buckets
from irpe_jax import config as config_lib
from irpe_jax import core
from irpe_jax import ops

Initializer = jax.nn.initializers.Initializer


def resolve_fields(head_dim, num_heads, mode, method, transposed, num_buckets,
                   rpe_config, impl):
  """Validated `(mode, method, num_buckets)`, defaults taken from the config."""
  if not isinstance(rpe_config, config_lib.SingleRPEConfig):
    raise TypeError('rpe_config must be a SingleRPEConfig (see '
                    f'get_single_rpe_config), got {rpe_config!r}.')
  for name, value in (('head_dim', head_dim), ('num_heads', num_heads)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}.')
  mode = config_lib.canonical_mode(rpe_config.mode if mode is None else mode)
  method = config_lib.canonical_method(
      rpe_config.method if method is None else method)
  if mode == 'bias' and not transposed:
    raise ValueError("mode='bias' does not exist on v (transposed=False).")
  ops.resolve_impl(impl)
  if num_buckets is None:
    num_buckets = rpe_config.num_buckets
  return mode, method, num_buckets


class _TableModule(nn.Module):
  """Fields shared by `IRPE` and `IRPECross` (see `IRPE`)."""
  head_dim: int
  num_heads: int = 1
  mode: Optional[str] = None
  method: Optional[str] = None
  transposed: bool = True
  num_buckets: Optional[int] = None
  rpe_config: Optional[config_lib.SingleRPEConfig] = None
  impl: str = 'auto'
  table_init: Initializer = nn.initializers.zeros_init()
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  def resolved_fields(self):
    return resolve_fields(self.head_dim, self.num_heads, self.mode,
                          self.method, self.transposed, self.num_buckets,
                          self.rpe_config, self.impl)


class IRPE(_TableModule):
  """One iRPE lookup table, as `iRPE` of the release.

  Attributes:
    head_dim: `D`, features per head.
    num_heads: `Ht`, heads of the table: 1 for a shared table.
    mode: 'bias' or 'contextual'; default `rpe_config.mode`.
    method: 'euc', 'quant', 'product', 'cross_rows' or 'cross_cols'; default
      `rpe_config.method` (use `IRPECross` for 'cross').
    transposed: True for q/k (input `(B, H, L, D)`), False for v (input
      attention weights `(B, H, L, L)`).
    num_buckets: default `rpe_config.num_buckets`.
    rpe_config: a `SingleRPEConfig` (alpha, beta, gamma, index function).
    impl: how lookups are computed, see `irpe_jax.ops`.
    table_init: initializer of the table; zeros as in the release.
    dtype: computation dtype; default the input's.
    param_dtype: dtype of the table.
  """

  @nn.compact
  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *,
               transpose_output: bool = False,
               scale: Optional[float] = None) -> jax.Array:
    """Encodes `x` (times `scale`); see `irpe_jax.core.rpe_lookup`."""
    mode, method, num_buckets = self.resolved_fields()
    if method == buckets.CROSS:
      raise ValueError("method='cross' holds two tables: use IRPECross.")
    name, shape = ops.table_shape(mode, self.transposed, self.num_heads,
                                  self.head_dim, num_buckets)
    table = self.param(name, self.table_init, shape, self.param_dtype)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return core.rpe_lookup(
        x, table, config=self.rpe_config, method=method,
        transposed=self.transposed, height=height, width=width,
        impl=self.impl, transpose_output=transpose_output, scale=scale)


class IRPECross(_TableModule):
  """The cross method: a rows table and a columns table, summed.

  Same attributes as `IRPE`; the children are `rp_rows` and `rp_cols`.
  """

  @nn.compact
  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *,
               transpose_output: bool = False,
               scale: Optional[float] = None) -> jax.Array:
    mode, method, num_buckets = self.resolved_fields()
    if method != buckets.CROSS:
      raise ValueError(f"IRPECross needs method='cross', got {method!r}.")
    out = 0
    for half in (buckets.CROSS_ROWS, buckets.CROSS_COLS):
      out = out + IRPE(
          head_dim=self.head_dim, num_heads=self.num_heads, mode=mode,
          method=half, transposed=self.transposed, num_buckets=num_buckets,
          rpe_config=self.rpe_config, impl=self.impl,
          table_init=self.table_init, dtype=self.dtype,
          param_dtype=self.param_dtype, name='rp_' + half[len('cross_'):],
      )(x, height, width, transpose_output=transpose_output, scale=scale)
    return out


def build_single_rpe(rpe_config: Optional[config_lib.SingleRPEConfig],
                     transposed: bool, head_dim: int, num_heads: int,
                     classes: Tuple[type, type] = (IRPE, IRPECross),
                     **kwargs) -> Optional[Any]:
  """The module for one of q/k/v, or None where the config is None.

  `classes` are the (single table, cross) module classes: Linen's by default,
  `irpe_jax.nnx` passes its own.
  """
  if rpe_config is None:
    return None
  cls = classes[1] if rpe_config.method == buckets.CROSS else classes[0]
  return cls(head_dim=head_dim,
             num_heads=1 if rpe_config.shared_head else num_heads,
             transposed=transposed, rpe_config=rpe_config, **kwargs)


def build_rpe(config: Optional[config_lib.RPEConfig], head_dim: int,
              num_heads: int, **kwargs
              ) -> Tuple[Optional[nn.Module], Optional[nn.Module],
                         Optional[nn.Module]]:
  """`(rpe_q, rpe_k, rpe_v)` modules of a config, as `build_rpe` of the release.

  Args:
    config: an `RPEConfig` from `get_rpe_config`, or None for no iRPE.
    head_dim: features per head.
    num_heads: attention heads (tables have 1 head when shared).
    **kwargs: `impl`, `table_init`, `dtype`, `param_dtype`.

  Returns:
    Three modules or None each.
  """
  if config is None:
    return None, None, None
  if not isinstance(config, config_lib.RPEConfig):
    raise TypeError(f'config must be an RPEConfig (see get_rpe_config), got '
                    f'{config!r}.')
  return (build_single_rpe(config.rpe_q, True, head_dim, num_heads, **kwargs),
          build_single_rpe(config.rpe_k, True, head_dim, num_heads, **kwargs),
          build_single_rpe(config.rpe_v, False, head_dim, num_heads, **kwargs))
