"""Flax NNX modules: the iRPE tables and self-attention with iRPE.

`IRPE`, `IRPECross`, `build_rpe` and `IRPEAttention` take the arguments of
their Linen peers in `irpe_jax.linen` (NNX modules are built eagerly, so
`IRPEAttention` also takes `in_features`, and all take `rngs`). They hold
the same parameters under the same names (`lookup_table_weight`,
`rp_rows`, `qkv/kernel`, ...; see `irpe_jax.tables`) and compute with the
same framework-free core (`irpe_jax.core`, `irpe_jax.attention`), so the
two APIs give equal outputs for equal parameters.
"""

import inspect
from typing import Any, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp

from irpe_jax import _checks
from irpe_jax import attention as attention_lib
from irpe_jax import config as config_lib
from irpe_jax import core
from irpe_jax import tables

Initializer = jax.nn.initializers.Initializer
_zeros = jax.nn.initializers.zeros
_lecun_normal = jax.nn.initializers.lecun_normal()
# Newer Flax sows only inside `nnx.capture`; older Flax has no such switch.
_SOW_KWARGS = ({'capture_noop': True} if 'capture_noop' in
               inspect.signature(nnx.Module.sow).parameters else {})


class _TableModule(nnx.Module):
  """The constructor shared by `IRPE` and `IRPECross`.

  Args:
    head_dim: `D`, features per head.
    num_heads: `Ht`, heads of the table: 1 for a shared table.
    mode: 'bias' or 'contextual'; default `rpe_config.mode`.
    method: default `rpe_config.method`; 'cross' for `IRPECross` only.
    for_qk: True for a table on q or k, False for one on v (the release's
      `transposed`).
    num_buckets: default `rpe_config.num_buckets`.
    rpe_config: a `SingleRPEConfig` (alpha, beta, gamma, index function).
    impl: how lookups are computed, see `irpe_jax.ops`.
    table_init: initializer of the tables; zeros as in the release.
    dtype: computation dtype; default the input's.
    param_dtype: dtype of the tables.
    rngs: `nnx.Rngs` with a 'params' stream.
  """
  _cross = False  # Subclasses define `_init_tables`, which makes the tables.

  def __init__(self, head_dim: int, num_heads: int = 1,
               mode: Optional[str] = None, method: Optional[str] = None,
               for_qk: bool = True, num_buckets: Optional[int] = None,
               rpe_config: Optional[config_lib.SingleRPEConfig] = None,
               impl: str = 'auto', table_init: Initializer = _zeros,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               *, rngs: nnx.Rngs):
    self.spec = tables.resolve_table(
        rpe_config, head_dim=head_dim, num_heads=num_heads, mode=mode,
        method=method, for_qk=for_qk, num_buckets=num_buckets, impl=impl,
        cross=self._cross)
    self.rpe_config, self.impl, self.dtype = rpe_config, impl, dtype
    self._init_tables(table_init, param_dtype, rngs)

  # `attention_with_rpe` may call it with `as_term=True` (blockwise).
  returns_terms = True

  @property
  def num_heads(self) -> int:
    return self.spec.num_heads

  @property
  def for_qk(self) -> bool:
    return self.spec.for_qk


class IRPE(_TableModule):
  """One iRPE lookup table; arguments as the Linen `irpe_jax.IRPE`."""

  def _init_tables(self, table_init, param_dtype, rngs):
    setattr(self, self.spec.param_name, nnx.Param(
        table_init(rngs.params(), self.spec.shape, param_dtype)))

  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *, x_tokens_last: bool = False,
               scale: Optional[float] = None, as_term: bool = False):
    """Encodes `x` (times `scale`); see `irpe_jax.core.rpe_lookup`.

    With `as_term=True`, returns `(core.rpe_term(...),)`, the table and its
    geometry for blockwise attention, instead of the encoding.
    """
    if self.dtype is not None:
      x = x.astype(self.dtype)
    spec = self.spec
    if as_term:
      return (core.rpe_term(
          x, getattr(self, spec.param_name)[...], config=self.rpe_config,
          method=spec.method, for_qk=spec.for_qk, mode=spec.mode,
          height=height, width=width, scale=scale),)
    return core.rpe_lookup(
        x, getattr(self, spec.param_name)[...], config=self.rpe_config,
        method=spec.method, for_qk=spec.for_qk, mode=spec.mode, height=height,
        width=width, impl=self.impl, x_tokens_last=x_tokens_last,
        scale=scale)


class IRPECross(_TableModule):
  """The cross method: children `rp_rows` and `rp_cols`, summed."""
  _cross = True

  def _init_tables(self, table_init, param_dtype, rngs):
    spec = self.spec
    for name, method in tables.CROSS_HALVES:
      setattr(self, name, IRPE(
          spec.head_dim, spec.num_heads, spec.mode, method, spec.for_qk,
          spec.num_buckets, self.rpe_config, self.impl, table_init,
          self.dtype, param_dtype, rngs=rngs))

  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *, x_tokens_last: bool = False,
               scale: Optional[float] = None, as_term: bool = False):
    """Encodes `x` (times `scale`) with both tables; see `IRPE`."""
    parts = [getattr(self, name)(x, height, width,
                                 x_tokens_last=x_tokens_last, scale=scale,
                                 as_term=as_term)
             for name, _ in tables.CROSS_HALVES]
    return parts[0] + parts[1] if as_term else sum(parts)


def build_single_rpe(rpe_config: Optional[config_lib.SingleRPEConfig],
                     for_qk: bool, head_dim: int, num_heads: int, *,
                     rngs: nnx.Rngs, **kwargs: Any
                     ) -> Optional[_TableModule]:
  """The NNX module for one of q/k/v, or None where the config is None."""
  return tables.build_single(rpe_config, for_qk, head_dim, num_heads,
                             (IRPE, IRPECross), rngs=rngs, **kwargs)


def build_rpe(config: Optional[config_lib.RPEConfig], head_dim: int,
              num_heads: int, *, rngs: nnx.Rngs, **kwargs: Any
              ) -> Tuple[Optional[_TableModule], Optional[_TableModule],
                         Optional[_TableModule]]:
  """`(rpe_q, rpe_k, rpe_v)` NNX modules; see the Linen `build_rpe`."""
  return tables.build_all(config, head_dim, num_heads, (IRPE, IRPECross),
                          rngs=rngs, **kwargs)


class QKVProjection(nnx.Module):
  """The release's `qkv` Linear: `kernel (C, 3C)` (= torch weight.T), `bias`."""

  def __init__(self, in_features: int, num_heads: int, use_bias: bool = True,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               kernel_init: Initializer = _lecun_normal,
               bias_init: Initializer = _zeros, *, rngs: nnx.Rngs):
    self.num_heads, self.dtype = num_heads, dtype
    self.kernel = nnx.Param(kernel_init(
        rngs.params(), (in_features, 3 * in_features), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (3 * in_features,),
                                     param_dtype)) if use_bias else None)

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array,
               inputs_v: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    kernel = self.kernel[...]
    bias = None if self.bias is None else self.bias[...]
    dtype = self.dtype or jnp.result_type(inputs_q, kernel)
    return attention_lib.split_qkv(kernel, bias, inputs_q, inputs_k, inputs_v,
                                   self.num_heads, dtype)


def _dropout_key(dropout: nnx.Dropout) -> jax.Array:
  """A fresh key from a Dropout module's stream, as its `__call__` takes."""
  rngs = dropout.rngs
  if rngs is None:
    raise ValueError('deterministic=False with attention dropout needs '
                     "rngs with a 'dropout' stream.")
  if isinstance(rngs, nnx.Rngs):
    return rngs[dropout.rng_collection]()
  return rngs()


class IRPEAttention(nnx.Module):
  """Multi-head self-attention with iRPE; the NNX peer of the Linen one.

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
    attention_impl: 'materialized', 'blockwise', 'pallas' or 'auto'; see
      the Linen `IRPEAttention`.
    block_q: queries per block of the blockwise path (default 128).
    block_k: keys per block of the blockwise path (default 128).
    rngs: `nnx.Rngs` with a 'params' stream (and 'dropout' for training).
  """

  def __init__(self, in_features: int, num_heads: int,
               rpe_config: Optional[config_lib.RPEConfig] = None,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dropout_rate: float = 0.0, proj_dropout_rate: float = 0.0,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               kernel_init: Initializer = _lecun_normal,
               bias_init: Initializer = _zeros, impl: str = 'auto',
               table_init: Initializer = _zeros,
               attention_impl: str = 'auto', block_q: Optional[int] = None,
               block_k: Optional[int] = None, *, rngs: nnx.Rngs):
    in_features = _checks.check_int('in_features', in_features, 1)
    attention_lib.resolve_attention_impl(attention_impl, 1)  # Checks it.
    self.attention_impl = attention_impl
    self.block_q, self.block_k = block_q, block_k
    num_heads = _checks.check_int('num_heads', num_heads, 1)
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
    inputs_k, inputs_v, _ = attention_lib.check_inputs(
        inputs_q, inputs_k, inputs_v, self.num_heads)
    batch, length, _ = inputs_q.shape
    attention_lib.check_mask(mask, batch, self.num_heads, length)
    q, k, v = self.qkv(inputs_q, inputs_k, inputs_v)
    attention_impl = attention_lib.resolve_attention_impl(
        self.attention_impl, length)
    dropout = dropout_rng = None
    rate = self.attn_dropout.rate
    if rate > 0 and not deterministic:
      if attention_impl == 'blockwise':
        dropout_rng = _dropout_key(self.attn_dropout)
      else:
        dropout = lambda w: self.attn_dropout(w, deterministic=False)
    out = attention_lib.attention_with_rpe(
        q, k, v, scale=self.scale, rpe_q=self.rpe_q, rpe_k=self.rpe_k,
        rpe_v=self.rpe_v, mask=mask, dropout=dropout, height=height,
        width=width,
        weights_hook=lambda w: self.sow(nnx.Intermediate, 'attention_weights',
                                        w, **_SOW_KWARGS),
        attention_impl=self.attention_impl, block_q=self.block_q,
        block_k=self.block_k,
        dropout_rate=rate if dropout_rng is not None else 0.0,
        dropout_rng=dropout_rng)
    out = self.proj(attention_lib.merge_heads(out))
    return self.proj_dropout(out, deterministic=deterministic)
