"""Flax NNX twins of the Linen modules: `IRPE`, `IRPECross`, `build_rpe`,
`IRPEAttention`.

They hold the same parameters under the same names as the Linen modules
(`lookup_table_weight`, `rp_rows`, `qkv.kernel`, ...) and call the same
functional core (`irpe_jax.core`, `irpe_jax.attention`), so the two APIs give
equal outputs for equal parameters.
"""

import inspect
from typing import Any, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp

from irpe_jax import attention as attention_lib
from irpe_jax import buckets
from irpe_jax import config as config_lib
from irpe_jax import core
from irpe_jax import ops
from irpe_jax import linen as rpe_linen

_zeros = jax.nn.initializers.zeros
_lecun_normal = jax.nn.initializers.lecun_normal()
# Newer Flax sows only inside `nnx.capture`; older Flax has no such switch.
_SOW_KWARGS = ({'capture_noop': True} if 'capture_noop' in
               inspect.signature(nnx.Module.sow).parameters else {})


class IRPE(nnx.Module):
  """One iRPE lookup table; arguments as the Linen `irpe_jax.IRPE`."""

  def __init__(self, head_dim: int, num_heads: int = 1,
               mode: Optional[str] = None, method: Optional[str] = None,
               transposed: bool = True, num_buckets: Optional[int] = None,
               rpe_config: Optional[config_lib.SingleRPEConfig] = None,
               impl: str = 'auto', table_init: Any = _zeros,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               *, rngs: nnx.Rngs):
    mode, method, num_buckets = rpe_linen.resolve_fields(
        head_dim, num_heads, mode, method, transposed, num_buckets,
        rpe_config, impl)
    if method == buckets.CROSS:
      raise ValueError("method='cross' holds two tables: use IRPECross.")
    self.method, self.transposed, self.rpe_config = method, transposed, rpe_config
    self.impl, self.dtype = impl, dtype
    self.table_name, shape = ops.table_shape(mode, transposed, num_heads,
                                             head_dim, num_buckets)
    setattr(self, self.table_name,
            nnx.Param(table_init(rngs.params(), shape, param_dtype)))

  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *,
               transpose_output: bool = False,
               scale: Optional[float] = None) -> jax.Array:
    """Encodes `x` (times `scale`); see `irpe_jax.core.rpe_lookup`."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return core.rpe_lookup(
        x, getattr(self, self.table_name)[...], config=self.rpe_config,
        method=self.method, transposed=self.transposed, height=height,
        width=width, impl=self.impl, transpose_output=transpose_output,
        scale=scale)


class IRPECross(nnx.Module):
  """The cross method: children `rp_rows` and `rp_cols`, summed."""

  def __init__(self, head_dim: int, num_heads: int = 1,
               mode: Optional[str] = None, method: Optional[str] = None,
               transposed: bool = True, num_buckets: Optional[int] = None,
               rpe_config: Optional[config_lib.SingleRPEConfig] = None,
               impl: str = 'auto', table_init: Any = _zeros,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               *, rngs: nnx.Rngs):
    mode, method, num_buckets = rpe_linen.resolve_fields(
        head_dim, num_heads, mode, method, transposed, num_buckets,
        rpe_config, impl)
    if method != buckets.CROSS:
      raise ValueError(f"IRPECross needs method='cross', got {method!r}.")
    kwargs = dict(head_dim=head_dim, num_heads=num_heads, mode=mode,
                  transposed=transposed, num_buckets=num_buckets,
                  rpe_config=rpe_config, impl=impl, table_init=table_init,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rp_rows = IRPE(method=buckets.CROSS_ROWS, **kwargs)
    self.rp_cols = IRPE(method=buckets.CROSS_COLS, **kwargs)

  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *,
               transpose_output: bool = False,
               scale: Optional[float] = None) -> jax.Array:
    kwargs = dict(transpose_output=transpose_output, scale=scale)
    return (self.rp_rows(x, height, width, **kwargs) +
            self.rp_cols(x, height, width, **kwargs))


def build_single_rpe(rpe_config: Optional[config_lib.SingleRPEConfig],
                     transposed: bool, head_dim: int, num_heads: int,
                     **kwargs) -> Optional[nnx.Module]:
  """The NNX module for one of q/k/v, or None where the config is None."""
  return rpe_linen.build_single_rpe(rpe_config, transposed, head_dim,
                                    num_heads, classes=(IRPE, IRPECross),
                                    **kwargs)


def build_rpe(config: Optional[config_lib.RPEConfig], head_dim: int,
              num_heads: int, *, rngs: nnx.Rngs, **kwargs
              ) -> Tuple[Optional[nnx.Module], Optional[nnx.Module],
                         Optional[nnx.Module]]:
  """`(rpe_q, rpe_k, rpe_v)` NNX modules; see `irpe_jax.build_rpe`."""
  if config is None:
    return None, None, None
  if not isinstance(config, config_lib.RPEConfig):
    raise TypeError(f'config must be an RPEConfig (see get_rpe_config), got '
                    f'{config!r}.')
  return tuple(
      build_single_rpe(cfg, target != 'v', head_dim, num_heads, rngs=rngs,
                       **kwargs)
      for target, cfg in zip('qkv', (config.rpe_q, config.rpe_k,
                                     config.rpe_v)))


class QKVProjection(nnx.Module):
  """The release's `qkv` Linear: `kernel (C, 3C)` (= torch weight.T), `bias`."""

  def __init__(self, in_features: int, num_heads: int, use_bias: bool = True,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               kernel_init: Any = _lecun_normal, bias_init: Any = _zeros,
               *, rngs: nnx.Rngs):
    self.num_heads, self.dtype = num_heads, dtype
    self.kernel = nnx.Param(kernel_init(
        rngs.params(), (in_features, 3 * in_features), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (3 * in_features,),
                                     param_dtype)) if use_bias else None)

  def __call__(self, inputs_q, inputs_k, inputs_v):
    kernel = self.kernel[...]
    bias = None if self.bias is None else self.bias[...]
    dtype = self.dtype or jnp.result_type(inputs_q, kernel)
    return attention_lib.split_qkv(kernel, bias, inputs_q, inputs_k, inputs_v,
                                   self.num_heads, dtype)


class IRPEAttention(nnx.Module):
  """Multi-head self-attention with iRPE; NNX twin of `irpe_jax.IRPEAttention`.

  Args:
    in_features: `C`, the feature size of the inputs and output.
    num_heads: attention heads; `C` must divide by it.
    rpe_config: an `RPEConfig` from `get_rpe_config`, or None (plain MHSA).
    qkv_bias: bias in the qkv projection.
    qk_scale: query scale; default `head_dim ** -0.5`.
    dropout_rate: dropout on the attention weights.
    proj_dropout_rate: dropout after the output projection.
    dtype: computation dtype (softmax stays float32).
    param_dtype: parameter dtype.
    kernel_init: initializer of the qkv and proj kernels.
    bias_init: initializer of their biases.
    impl: iRPE lookup implementation, see `irpe_jax.ops`.
    table_init: initializer of the iRPE tables; zeros as in the release.
    rngs: `nnx.Rngs` with a 'params' stream (and 'dropout' for training).
  """

  def __init__(self, in_features: int, num_heads: int,
               rpe_config: Optional[config_lib.RPEConfig] = None,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dropout_rate: float = 0.0, proj_dropout_rate: float = 0.0,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               kernel_init: Any = _lecun_normal, bias_init: Any = _zeros,
               impl: str = 'auto', table_init: Any = _zeros,
               *, rngs: nnx.Rngs):
    if in_features % num_heads:
      raise ValueError(f'in_features={in_features} is not divisible by '
                       f'num_heads={num_heads}.')
    head_dim = in_features // num_heads
    self.num_heads = num_heads
    self.scale = qk_scale or head_dim ** -0.5
    self.qkv = QKVProjection(in_features, num_heads, qkv_bias, dtype,
                             param_dtype, kernel_init, bias_init, rngs=rngs)
    self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(
        rpe_config, head_dim, num_heads, rngs=rngs, impl=impl,
        table_init=table_init, dtype=dtype, param_dtype=param_dtype)
    self.attn_dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.proj = nnx.Linear(in_features, in_features, dtype=dtype,
                           param_dtype=param_dtype, kernel_init=kernel_init,
                           bias_init=bias_init, rngs=rngs)
    self.proj_dropout = nnx.Dropout(proj_dropout_rate, rngs=rngs)

  def __call__(self, inputs_q: jax.Array, inputs_k: Optional[jax.Array] = None,
               inputs_v: Optional[jax.Array] = None, *,
               height: Optional[int] = None, width: Optional[int] = None,
               mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """As the Linen `IRPEAttention.__call__`.

    The attention weights are sown as `nnx.Intermediate` `attention_weights`;
    read them with `nnx.capture(model, nnx.Intermediate)(x)`.
    """
    inputs_k, inputs_v, head_dim = attention_lib.check_inputs(
        inputs_q, inputs_k, inputs_v, self.num_heads)
    batch, length, features = inputs_q.shape
    attention_lib.check_mask(mask, batch, self.num_heads, length)
    q, k, v = self.qkv(inputs_q, inputs_k, inputs_v)
    dropout = None
    if self.attn_dropout.rate > 0 and not deterministic:
      dropout = lambda w: self.attn_dropout(w, deterministic=False)
    out = attention_lib.attention_with_rpe(
        q, k, v, scale=self.scale, rpe_q=self.rpe_q, rpe_k=self.rpe_k,
        rpe_v=self.rpe_v, mask=mask, dropout=dropout, height=height,
        width=width,
        weights_hook=lambda w: self.sow(nnx.Intermediate, 'attention_weights',
                                        w, **_SOW_KWARGS))
    out = jnp.swapaxes(out, 1, 2).reshape(batch, length, features)
    return self.proj_dropout(self.proj(out), deterministic=deterministic)
