"""Flax Linen modules: the iRPE tables and self-attention with iRPE.

The modules hold parameters under the release's names and layouts (see
`irpe_jax.tables`), so converted PyTorch weights drop in, and compute with
the framework-free core (`irpe_jax.core`, `irpe_jax.attention`) that the NNX
modules in `irpe_jax.nnx` share.
"""

from typing import Any, ClassVar, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from irpe_jax import attention as attention_lib
from irpe_jax import config as config_lib
from irpe_jax import core
from irpe_jax import tables

Initializer = jax.nn.initializers.Initializer


class _TableModule(nn.Module):
  """Fields shared by `IRPE` and `IRPECross` (see `IRPE`)."""
  head_dim: int
  num_heads: int = 1
  mode: Optional[str] = None
  method: Optional[str] = None
  for_qk: bool = True
  num_buckets: Optional[int] = None
  rpe_config: Optional[config_lib.SingleRPEConfig] = None
  impl: str = 'auto'
  table_init: Initializer = nn.initializers.zeros_init()
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  # `attention_with_rpe` may call it with `as_term=True` (blockwise).
  returns_terms: ClassVar[bool] = True

  def _spec(self, cross: bool) -> tables.TableSpec:
    return tables.resolve_table(
        self.rpe_config, head_dim=self.head_dim, num_heads=self.num_heads,
        mode=self.mode, method=self.method, for_qk=self.for_qk,
        num_buckets=self.num_buckets, impl=self.impl, cross=cross)


class IRPE(_TableModule):
  """One iRPE lookup table, as `iRPE` of the release.

  Example:
    >>> cfg = irpe_jax.get_single_rpe_config(skip=1)
    >>> rpe_k = irpe_jax.IRPE(head_dim=64, rpe_config=cfg)
    >>> e = rpe_k.apply(variables, q)  # q: (B, H, 1 + 14 * 14, 64)
    >>> e.shape  # (B, H, 197, 197), added to the attention logits

  Attributes:
    head_dim: `D`, features per head.
    num_heads: `Ht`, heads of the table: 1 for a shared table.
    mode: 'bias' or 'contextual'; default `rpe_config.mode`.
    method: 'euc', 'quant', 'product', 'cross_rows' or 'cross_cols'; default
      `rpe_config.method` (use `IRPECross` for 'cross').
    for_qk: True for a table on q or k (input `(B, H, L, D)`), False for one
      on v (input the attention weights `(B, H, L, L)`). The release calls
      it `transposed`.
    num_buckets: default `rpe_config.num_buckets`.
    rpe_config: a `SingleRPEConfig` (alpha, beta, gamma, index function).
    impl: how lookups are computed, see `irpe_jax.ops`.
    table_init: initializer of the table; zeros as in the release.
    dtype: computation dtype; default the input's.
    param_dtype: dtype of the table.
  """

  @nn.compact
  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *, x_tokens_last: bool = False,
               scale: Optional[float] = None, as_term: bool = False):
    """Encodes `x` (times `scale`); see `irpe_jax.core.rpe_lookup`.

    With `as_term=True`, returns `(core.rpe_term(...),)`, the table and its
    geometry for blockwise attention, instead of the encoding.
    """
    spec = self._spec(cross=False)
    table = self.param(spec.param_name, self.table_init, spec.shape,
                       self.param_dtype)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if as_term:
      return (core.rpe_term(
          x, table, config=self.rpe_config, method=spec.method,
          for_qk=spec.for_qk, mode=spec.mode, height=height, width=width,
          scale=scale),)
    return core.rpe_lookup(
        x, table, config=self.rpe_config, method=spec.method,
        for_qk=spec.for_qk, mode=spec.mode, height=height, width=width,
        impl=self.impl, x_tokens_last=x_tokens_last, scale=scale)


class IRPECross(_TableModule):
  """The cross method: a rows table and a columns table, summed.

  Same attributes as `IRPE`; the children are `rp_rows` and `rp_cols`.
  """

  @nn.compact
  def __call__(self, x: jax.Array, height: Optional[int] = None,
               width: Optional[int] = None, *, x_tokens_last: bool = False,
               scale: Optional[float] = None, as_term: bool = False):
    """Encodes `x` (times `scale`) with both tables; see `IRPE`."""
    spec = self._spec(cross=True)
    out = () if as_term else 0
    for name, method in tables.CROSS_HALVES:
      out = out + IRPE(
          head_dim=spec.head_dim, num_heads=spec.num_heads, mode=spec.mode,
          method=method, for_qk=spec.for_qk, num_buckets=spec.num_buckets,
          rpe_config=self.rpe_config, impl=self.impl,
          table_init=self.table_init, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
      )(x, height, width, x_tokens_last=x_tokens_last, scale=scale,
        as_term=as_term)
    return out


def build_single_rpe(rpe_config: Optional[config_lib.SingleRPEConfig],
                     for_qk: bool, head_dim: int, num_heads: int,
                     **kwargs: Any) -> Optional[_TableModule]:
  """The module for one of q/k/v (`IRPE` or `IRPECross`), or None."""
  return tables.build_single(rpe_config, for_qk, head_dim, num_heads,
                             (IRPE, IRPECross), **kwargs)


def build_rpe(config: Optional[config_lib.RPEConfig], head_dim: int,
              num_heads: int, **kwargs: Any
              ) -> Tuple[Optional[_TableModule], Optional[_TableModule],
                         Optional[_TableModule]]:
  """`(rpe_q, rpe_k, rpe_v)` modules of a config, as `build_rpe` of the release.

  Args:
    config: an `RPEConfig` from `get_rpe_config`, or None for no iRPE.
    head_dim: features per head.
    num_heads: attention heads (tables have 1 head when shared).
    **kwargs: `impl`, `table_init`, `dtype`, `param_dtype`.

  Returns:
    Three modules or None each.
  """
  return tables.build_all(config, head_dim, num_heads, (IRPE, IRPECross),
                          **kwargs)


class QKVProjection(nn.Module):
  """The release's `qkv` Linear: `kernel (C, 3C)` (= torch weight.T), `bias`.

  Returns per-head `(B, H, N, D)` q, k and v; see
  `irpe_jax.attention.split_qkv`.
  """
  num_heads: int
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array,
               inputs_v: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    features = inputs_q.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (features, 3 * features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (3 * features,),
                       self.param_dtype) if self.use_bias else None)
    dtype = self.dtype or jnp.result_type(inputs_q, kernel)
    return attention_lib.split_qkv(kernel, bias, inputs_q, inputs_k,
                                   inputs_v, self.num_heads, dtype)


class IRPEAttention(nn.Module):
  """Multi-head self-attention with iRPE, as `RPEAttention` of the release.

  Example:
    >>> cfg = irpe_jax.get_rpe_config(ratio=1.9, method='product',
    ...                               mode='ctx', shared_head=True, skip=1)
    >>> attn = irpe_jax.IRPEAttention(num_heads=6, rpe_config=cfg)
    >>> y = attn.apply(params, x)  # x: (B, 1 + 14 * 14, 384)

  Attributes:
    num_heads: attention heads; the feature size must divide by it.
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
    attention_impl: 'materialized', 'blockwise', 'pallas' or 'auto'
      (default; see `irpe_jax.attention`). The blockwise paths do not sow
      the attention weights; 'pallas' takes no attention dropout.
    block_q: queries per block of the blockwise path (default 128).
    block_k: keys per block of the blockwise path (default 128).
  """
  num_heads: int
  rpe_config: Optional[config_lib.RPEConfig] = None
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  dropout_rate: float = 0.0
  proj_dropout_rate: float = 0.0
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  impl: str = 'auto'
  table_init: Initializer = nn.initializers.zeros_init()
  attention_impl: str = 'auto'
  block_q: Optional[int] = None
  block_k: Optional[int] = None

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_k: Optional[jax.Array] = None,
               inputs_v: Optional[jax.Array] = None, *,
               height: Optional[int] = None, width: Optional[int] = None,
               mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Attends over `(B, N, C)` inputs; k and v default to q.

    Args:
      inputs_q: `(B, N, C)` queries' input.
      inputs_k: `(B, N, C)` keys' input; default `inputs_q`.
      inputs_v: `(B, N, C)` values' input; default `inputs_k`.
      height: rows of the token grid (static); default `floor(sqrt(N))`.
      width: columns of the token grid (static).
      mask: boolean, broadcastable to `(B, H, N, N)`, True = attend.
      deterministic: disables dropout when True.

    Returns:
      `(B, N, C)`. The attention weights `(B, H, N, N)` are sown as
      `intermediates/attention_weights` (apply with
      `mutable=['intermediates']` to read them).
    """
    inputs_k, inputs_v, head_dim = attention_lib.check_inputs(
        inputs_q, inputs_k, inputs_v, self.num_heads)
    batch, length, features = inputs_q.shape
    attention_lib.check_mask(mask, batch, self.num_heads, length)
    q, k, v = QKVProjection(
        self.num_heads, self.qkv_bias, self.dtype, self.param_dtype,
        self.kernel_init, self.bias_init, name='qkv')(inputs_q, inputs_k,
                                                       inputs_v)
    rpe_kwargs = dict(impl=self.impl, table_init=self.table_init,
                      dtype=self.dtype, param_dtype=self.param_dtype)
    rpes = {name: build_single_rpe(single, for_qk, head_dim, self.num_heads,
                                   name=name, **rpe_kwargs)
            for name, single, for_qk in tables.targets(self.rpe_config)}
    attention_impl = attention_lib.resolve_attention_impl(
        self.attention_impl, length)
    dropout = dropout_rng = None
    if self.dropout_rate > 0 and not deterministic:
      if attention_impl == 'blockwise':
        dropout_rng = self.make_rng('dropout')
      else:
        dropout = nn.Dropout(self.dropout_rate, deterministic=False)
    out = attention_lib.attention_with_rpe(
        q, k, v, scale=self.qk_scale or head_dim ** -0.5, mask=mask,
        dropout=dropout, height=height, width=width,
        weights_hook=lambda w: self.sow('intermediates', 'attention_weights',
                                        w),
        attention_impl=self.attention_impl, block_q=self.block_q,
        block_k=self.block_k,
        dropout_rate=self.dropout_rate if dropout_rng is not None else 0.0,
        dropout_rng=dropout_rng, **rpes)
    out = nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=self.kernel_init, bias_init=self.bias_init,
                   name='proj')(attention_lib.merge_heads(out))
    return nn.Dropout(self.proj_dropout_rate)(out, deterministic=deterministic)
