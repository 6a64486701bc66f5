"""DETR's post-norm transformer with iRPE in the encoder self-attention.

The release's `models/transformer.py` (DETR's, Carion et al. 2020, with
`RPEMultiheadAttention` in the encoder; Wu et al., ICCV 2021): 6 encoder
layers whose self-attention is `irpe_jax.IRPEAttention` (q = k = src + pos,
v = src, key padding applied after the iRPE terms, iRPE on the padded
`h x w` feature map with no skip tokens), 6 decoder layers with plain
self- and cross-attention, and every decoder output through the shared final
`decoder/norm`. Batch-first: `(B, L, C)` where the release has `(L, B, C)`.

Parameter names follow the release (`encoder/layers_{i}/{self_attn, linear1,
linear2, norm1, norm2}`, `decoder/layers_{i}/{self_attn, multihead_attn,
linear1, linear2, norm1, norm2, norm3}`, `decoder/norm`); each attention
holds `torch.nn.MultiheadAttention`'s packed `in_proj` as `qkv/kernel
(C, 3C)` (its `weight.T`, q's third first) and `out_proj` as `proj`.
Initialisation follows the release: xavier-uniform for every weight of two
or more dimensions (iRPE tables included, with PyTorch's fans, or zeros),
zero attention biases, PyTorch's default for the feed-forward biases.
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import attention as attention_lib
from irpe_jax import config as config_lib
from irpe_jax import linen as irpe_linen

Initializer = jax.nn.initializers.Initializer
_xavier = nn.initializers.xavier_uniform()
# torch's LayerNorm epsilon; Flax's default is 1e-6.
LAYER_NORM_EPS = 1e-5


def torch_linear_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default `nn.Linear` bias: uniform in `+-1 / sqrt(fan_in)`."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _layer_norm(name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it, not E[x^2] - E[x]^2.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False,
                      dtype=dtype, param_dtype=param_dtype, name=name)


class InProjection(nn.Module):
  """`torch.nn.MultiheadAttention`'s packed q/k/v projection.

  `kernel (C, 3C)` (= `in_proj_weight.T`), `bias (3C,)`; `part` 0, 1, 2
  projects with the q, k or v third, so that inputs of different lengths
  (cross-attention) each take only their own third.
  """
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, part: int) -> jax.Array:
    """`(B, L, C)` -> `(B, L, C)` with third `part` of the projection."""
    features = x.shape[-1]
    kernel = self.param('kernel', _xavier, (features, 3 * features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (3 * features,),
                      self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    cols = slice(part * features, (part + 1) * features)
    return (jnp.dot(x.astype(dtype), kernel[:, cols].astype(dtype))
            + bias[cols].astype(dtype))


class MultiheadAttention(nn.Module):
  """`torch.nn.MultiheadAttention` (bias, no `add_zero_attn`), batch-first.

  Attributes:
    num_heads: heads; the feature size must divide by it.
    dropout_rate: dropout on the attention weights.
    dtype: computation dtype (softmax stays float32).
    param_dtype: parameter dtype.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
               key_padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Attends from `query (B, Lq, C)` over `key`, `value (B, Lk, C)`.

    Args:
      query: `(B, Lq, C)`.
      key: `(B, Lk, C)`.
      value: `(B, Lk, C)`.
      key_padding_mask: `(B, Lk)` bool, True = padding key to ignore (the
        release's convention).
      deterministic: disables dropout when True.

    Returns:
      `(B, Lq, C)`.
    """
    batch, _, features = query.shape
    if features % self.num_heads:
      raise ValueError(f'The feature size {features} is not divisible by '
                       f'num_heads={self.num_heads}.')
    head_dim = features // self.num_heads
    proj = InProjection(self.dtype, self.param_dtype, name='qkv')

    def heads(x, part):  # (B, L, C) -> (B, H, L, D)
      y = proj(x, part)
      return jnp.swapaxes(y.reshape(batch, -1, self.num_heads, head_dim), 1, 2)

    mask = None
    if key_padding_mask is not None:
      mask = ~key_padding_mask[:, None, None, :]
    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      dropout = nn.Dropout(self.dropout_rate, deterministic=False)
    out = attention_lib.attention_with_rpe(
        heads(query, 0), heads(key, 1), heads(value, 2),
        scale=head_dim ** -0.5, mask=mask, dropout=dropout)
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_xavier, name='proj')(
                        attention_lib.merge_heads(out))


def _feed_forward(x: jax.Array, dim_feedforward: int, dropout_rate: float,
                  dtype: Any, param_dtype: Any, deterministic: bool
                  ) -> jax.Array:
  """`linear2(dropout(relu(linear1(x))))`, in the calling layer's scope.

  A function rather than a module: the release's `linear1` and `linear2`
  sit directly in the layer, and so do their Flax params.
  """
  features = x.shape[-1]
  dense = lambda n, fan_in, name: nn.Dense(
      n, dtype=dtype, param_dtype=param_dtype, kernel_init=_xavier,
      bias_init=torch_linear_bias_init(fan_in), name=name)
  x = nn.relu(dense(dim_feedforward, features, 'linear1')(x))
  x = nn.Dropout(dropout_rate)(x, deterministic=deterministic)
  return dense(features, dim_feedforward, 'linear2')(x)


class EncoderLayer(nn.Module):
  """Post-norm encoder layer with iRPE self-attention (`forward_post`).

  Attributes:
    num_heads: attention heads.
    dim_feedforward: hidden size of the feed-forward network.
    dropout_rate: dropout on the attention weights, the residual branches
      and the feed-forward hidden layer (the release's 0.1).
    rpe_config: iRPE of the self-attention (`skip` 0), or None.
    rpe_table_init: initializer of the iRPE tables.
    impl: iRPE lookup implementation, see `irpe_jax.ops`.
    attention_impl: 'materialized', 'blockwise', 'pallas' or 'auto' (see
      `irpe_jax.attention.resolve_attention_impl`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  num_heads: int
  dim_feedforward: int = 2048
  dropout_rate: float = 0.1
  rpe_config: Optional[config_lib.RPEConfig] = None
  rpe_table_init: Initializer = nn.initializers.zeros_init()
  impl: str = 'auto'
  attention_impl: str = 'auto'
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array,
               key_padding_mask: Optional[jax.Array], height: int, width: int,
               deterministic: bool = True) -> jax.Array:
    """`src`, `pos (B, L = height * width, C)`, padding `(B, L)` -> `(B, L, C)`.
    """
    dropout = lambda x: nn.Dropout(self.dropout_rate)(
        x, deterministic=deterministic)
    mask = None if key_padding_mask is None else (
        ~key_padding_mask[:, None, None, :])
    q = src + pos
    src2 = irpe_linen.IRPEAttention(
        num_heads=self.num_heads, rpe_config=self.rpe_config,
        dropout_rate=self.dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=_xavier, impl=self.impl,
        attention_impl=self.attention_impl,
        table_init=self.rpe_table_init, name='self_attn')(
            q, q, src, height=height, width=width, mask=mask,
            deterministic=deterministic)
    src = _layer_norm('norm1', self.dtype, self.param_dtype)(
        src + dropout(src2))
    src2 = _feed_forward(src, self.dim_feedforward, self.dropout_rate,
                         self.dtype, self.param_dtype, deterministic)
    return _layer_norm('norm2', self.dtype, self.param_dtype)(
        src + dropout(src2))


class DecoderLayer(nn.Module):
  """Post-norm decoder layer: self-attention, cross-attention, feed-forward.

  Attributes: as `EncoderLayer`, without iRPE.
  """
  num_heads: int
  dim_feedforward: int = 2048
  dropout_rate: float = 0.1
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array,
               query_pos: jax.Array, memory_key_padding_mask: Optional[
                   jax.Array], deterministic: bool = True) -> jax.Array:
    """`tgt`, `query_pos (B, Q, C)`; `memory`, `pos (B, L, C)` -> (B, Q, C)."""
    dropout = lambda x: nn.Dropout(self.dropout_rate)(
        x, deterministic=deterministic)
    attention = lambda name: MultiheadAttention(
        self.num_heads, self.dropout_rate, self.dtype, self.param_dtype,
        name=name)
    norm = lambda name: _layer_norm(name, self.dtype, self.param_dtype)
    q = tgt + query_pos
    tgt2 = attention('self_attn')(q, q, tgt, deterministic=deterministic)
    tgt = norm('norm1')(tgt + dropout(tgt2))
    tgt2 = attention('multihead_attn')(
        tgt + query_pos, memory + pos, memory,
        key_padding_mask=memory_key_padding_mask, deterministic=deterministic)
    tgt = norm('norm2')(tgt + dropout(tgt2))
    tgt2 = _feed_forward(tgt, self.dim_feedforward, self.dropout_rate,
                         self.dtype, self.param_dtype, deterministic)
    return norm('norm3')(tgt + dropout(tgt2))


def _layer_class(cls: type, remat: bool, static_argnums: Tuple[int, ...]
                 ) -> Callable[..., nn.Module]:
  return nn.remat(cls, static_argnums=static_argnums) if remat else cls


class _Stack(nn.Module):
  """Fields shared by `Encoder` and `Decoder` (see `Transformer`)."""
  num_layers: int = 6
  num_heads: int = 8
  dim_feedforward: int = 2048
  dropout_rate: float = 0.1
  remat: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  def _layer_kwargs(self):
    return dict(num_heads=self.num_heads,
                dim_feedforward=self.dim_feedforward,
                dropout_rate=self.dropout_rate, dtype=self.dtype,
                param_dtype=self.param_dtype)


class Encoder(_Stack):
  """`layers_{i}`: encoder layers with iRPE; no final norm (post-norm)."""
  rpe_config: Optional[config_lib.RPEConfig] = None
  rpe_table_init: Initializer = nn.initializers.zeros_init()
  impl: str = 'auto'
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array,
               key_padding_mask: Optional[jax.Array], height: int, width: int,
               deterministic: bool = True) -> jax.Array:
    """`src`, `pos (B, height * width, C)` -> memory `(B, L, C)`."""
    layer = _layer_class(EncoderLayer, self.remat, (4, 5, 6))
    for i in range(self.num_layers):
      src = layer(rpe_config=self.rpe_config,
                  rpe_table_init=self.rpe_table_init, impl=self.impl,
                  attention_impl=self.attention_impl,
                  name=f'layers_{i}', **self._layer_kwargs())(
                      src, pos, key_padding_mask, height, width,
                      deterministic)
    return src


class Decoder(_Stack):
  """`layers_{i}` and the shared final `norm` of every layer's output."""

  @nn.compact
  def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array,
               query_pos: jax.Array,
               memory_key_padding_mask: Optional[jax.Array],
               deterministic: bool = True) -> jax.Array:
    """Returns `(num_layers, B, Q, C)`: each layer's output, normalised."""
    layer = _layer_class(DecoderLayer, self.remat, (6,))
    norm = _layer_norm('norm', self.dtype, self.param_dtype)
    outputs = []
    for i in range(self.num_layers):
      tgt = layer(name=f'layers_{i}', **self._layer_kwargs())(
          tgt, memory, pos, query_pos, memory_key_padding_mask,
          deterministic)
      outputs.append(norm(tgt))
    return jnp.stack(outputs)


class Transformer(nn.Module):
  """The release's `Transformer` with `return_intermediate_dec=True`.

  Attributes:
    num_heads: attention heads.
    enc_layers: encoder layers.
    dec_layers: decoder layers.
    dim_feedforward: hidden size of every feed-forward network.
    dropout_rate: dropout everywhere (the release's 0.1).
    rpe_config: iRPE of every encoder self-attention (each layer its own
      tables), or None for DETR's plain encoder.
    rpe_table_init: initializer of the iRPE tables.
    impl: iRPE lookup implementation, see `irpe_jax.ops`.
    attention_impl: 'materialized', 'blockwise', 'pallas' or 'auto' (see
      `irpe_jax.attention.resolve_attention_impl`).
    remat: rematerialises each layer in the backward pass.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  num_heads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  dim_feedforward: int = 2048
  dropout_rate: float = 0.1
  rpe_config: Optional[config_lib.RPEConfig] = None
  rpe_table_init: Initializer = nn.initializers.zeros_init()
  impl: str = 'auto'
  attention_impl: str = 'auto'
  remat: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src: jax.Array, key_padding_mask: jax.Array,
               query_embed: jax.Array, pos: jax.Array, *,
               deterministic: bool = True) -> Tuple[jax.Array, jax.Array]:
    """Encodes a feature map and decodes the object queries.

    Args:
      src: `(B, h, w, C)` projected backbone features.
      key_padding_mask: `(B, h, w)` bool, True = padding.
      query_embed: `(Q, C)` learned query positions.
      pos: `(B, h, w, C)` position encoding of the feature map.
      deterministic: disables dropout when True.

    Returns:
      `(hs, memory)`: `hs (dec_layers, B, Q, C)`, the output of every
      decoder layer through `decoder/norm`, and the encoder output
      `memory (B, h * w, C)`.
    """
    batch, height, width, features = src.shape
    src = src.reshape(batch, height * width, features)
    pos = pos.reshape(batch, height * width, features).astype(src.dtype)
    key_padding_mask = key_padding_mask.reshape(batch, height * width)
    stack = dict(num_heads=self.num_heads,
                 dim_feedforward=self.dim_feedforward,
                 dropout_rate=self.dropout_rate, remat=self.remat,
                 dtype=self.dtype, param_dtype=self.param_dtype)
    memory = Encoder(num_layers=self.enc_layers, rpe_config=self.rpe_config,
                     rpe_table_init=self.rpe_table_init, impl=self.impl,
                     attention_impl=self.attention_impl,
                     name='encoder', **stack)(
                         src, pos, key_padding_mask, height, width,
                         deterministic)
    query_pos = jnp.broadcast_to(query_embed.astype(src.dtype)[None],
                                 (batch,) + query_embed.shape)
    hs = Decoder(num_layers=self.dec_layers, name='decoder', **stack)(
        jnp.zeros_like(query_pos), memory, pos, query_pos, key_padding_mask,
        deterministic)
    return hs, memory
