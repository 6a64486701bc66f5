"""DeiT (a ViT trained as in Touvron et al.) with iRPE in every block.

The layout and parameter names follow the release's `VisionTransformer`
(timm's DeiT with `RPEAttention`), so that its checkpoints convert one to one
(see `irpe_jax.convert`): `patch_embed/proj`, `cls_token`, `dist_token`,
`pos_embed`, `blocks_{i}/{norm1, attn, norm2, mlp/fc1, mlp/fc2}`, `norm`,
`head`, `head_dist`. Initialisation follows timm too: truncated normal with
std 0.02 for Linear kernels, tokens and `pos_embed` (Flax truncates at two
standard deviations), PyTorch's default for the patch conv kernel, zero
biases, unit LayerNorm scales and zero iRPE tables.

Images of another size than `img_size` work without any change of params:
the bucket ids of iRPE are computed for the actual patch grid (which may be
non-square), the iRPE tables are kept, and the absolute position embedding
is resampled bicubically to the grid (`resample_posemb`), as timm and
big_vision do for high-resolution fine-tuning.
"""

import dataclasses
from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import _checks
from irpe_jax import config as config_lib
from irpe_jax import linen as irpe_linen

# DeiT's sizes (Touvron et al. 2021, Table 1): all have 12 blocks, MLP ratio
# 4 and, as released, 16x16 patches at 224px; `VisionTransformer`'s
# defaults are DeiT-B's.
SIZES = {
    'tiny': dict(embed_dim=192, num_heads=3),
    'small': dict(embed_dim=384, num_heads=6),
    'base': dict(embed_dim=768, num_heads=12),
}

# timm's `_init_weights`: trunc-normal(0.02) Linear kernels, zero biases.
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_token_init = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init (kaiming-uniform with a = sqrt(5)).
_conv_init = nn.initializers.variance_scaling(1.0 / 3, 'fan_in', 'uniform')


def resample_posemb(posemb: jax.Array, grid: Tuple[int, int],
                    num_prefix_tokens: int,
                    old_grid: Optional[Tuple[int, int]] = None) -> jax.Array:
  """Resizes the grid of position embeddings to `grid`, bicubically.

  Use it to fine-tune at a new resolution: build the model with the new
  `img_size` and set `params['pos_embed'] = resample_posemb(old, (gh, gw),
  num_prefix_tokens)`. The embeddings of the prefix tokens (class,
  distillation) are kept as they are.

  Args:
    posemb: `(1, P + rows * cols, C)` embeddings: `P` prefix tokens, then a
      `rows x cols` grid in row-major order.
    grid: `(rows, cols)` of the new patch grid.
    num_prefix_tokens: `P`.
    old_grid: `(rows, cols)` of `posemb`; default a square grid.

  Returns:
    `(1, P + grid[0] * grid[1], C)`; `posemb` itself when the grid is
    unchanged.
  """
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'posemb must have shape (1, N, C), got {posemb.shape}.')
  prefix, old = (posemb[:, :num_prefix_tokens],
                 posemb[0, num_prefix_tokens:])
  if old_grid is None:
    size = int(np.sqrt(old.shape[0]))
    old_grid = (size, size)
  if old_grid[0] * old_grid[1] != old.shape[0]:
    raise ValueError(f'posemb has {old.shape[0]} grid tokens after '
                     f'{num_prefix_tokens} prefix tokens, which is not '
                     f'old_grid={old_grid}.')
  rows, cols = grid
  if tuple(old_grid) == (rows, cols):
    return posemb
  old = old.reshape(*old_grid, -1)
  new = jax.image.resize(old.astype(jnp.float32), (rows, cols, old.shape[-1]),
                         method='bicubic').astype(posemb.dtype)
  return jnp.concatenate([prefix, new.reshape(1, rows * cols, -1)], axis=1)


def rpe_config_for_prefix(rpe_config: Optional[config_lib.RPEConfig],
                          num_prefix_tokens: int
                          ) -> Optional[config_lib.RPEConfig]:
  """`rpe_config` with `skip` set to the model's prefix tokens.

  A table's bucket count only tells whether there are skip tokens (any
  `skip >= 1` adds the one bucket they all share), so a config built with
  `skip=1`, as the release's are, serves a distilled model's two prefix
  tokens with the same tables, as the release does. A config with
  `skip=0` has no such bucket and cannot.

  Args:
    rpe_config: the model's `RPEConfig`, or None.
    num_prefix_tokens: the class token and, if distilled, the distillation
      token.

  Returns:
    The config with `skip=num_prefix_tokens` on each table (itself if
    already so; same tables and parameters), or None.

  Raises:
    ValueError: if a table has `skip=0`.
  """
  if rpe_config is None:
    return None
  changed = {}
  for name in ('rpe_q', 'rpe_k', 'rpe_v'):
    single = getattr(rpe_config, name)
    if single is None or single.skip == num_prefix_tokens:
      continue
    if single.skip == 0:
      raise ValueError(
          f'rpe_config skip=0 ({name}) but the model has num_prefix_tokens='
          f'{num_prefix_tokens} (class token'
          f'{" and distillation token" if num_prefix_tokens == 2 else ""}): '
          f'its {single.num_buckets}-bucket table has no bucket for them; '
          f'build the config with skip={num_prefix_tokens} (any skip >= 1 '
          f'gives the same tables).')
    changed[name] = dataclasses.replace(single, skip=num_prefix_tokens)
  return dataclasses.replace(rpe_config, **changed) if changed else rpe_config


class DropPath(nn.Module):
  """Stochastic depth: drops whole residual branches per sample.

  Attributes:
    rate: probability of dropping the branch of a sample.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping `patch x patch` patches, embedded by a conv `proj`."""
  patch_size: int
  embed_dim: int
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """`(B, H, W, C)` images -> `(B, H / p, W / p, embed_dim)`."""
    p = self.patch_size
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID',
                   kernel_init=_conv_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='proj')(images)


class Mlp(nn.Module):
  """`fc1`, exact GELU, dropout, `fc2`, dropout."""
  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype,
                                     param_dtype=self.param_dtype,
                                     kernel_init=_dense_init, name=name)
    features = x.shape[-1]
    x = nn.gelu(dense(self.hidden_dim, 'fc1')(x), approximate=False)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
    x = dense(features, 'fc2')(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm block with iRPE attention, as the release's `RPEBlock`.

  `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  rpe_config: Optional[config_lib.RPEConfig] = None
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  impl: str = 'auto'
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, height: int, width: int,
               deterministic: bool) -> jax.Array:
    """`(B, N, C)` tokens of a `height x width` grid (after prefix tokens)."""
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    drop_path = DropPath(self.drop_path_rate)
    y = irpe_linen.IRPEAttention(
        num_heads=self.num_heads, rpe_config=self.rpe_config,
        qkv_bias=self.qkv_bias, dropout_rate=self.attn_drop_rate,
        proj_dropout_rate=self.drop_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=_dense_init,
        impl=self.impl, attention_impl=self.attention_impl, name='attn')(
            norm('norm1')(x), height=height, width=width,
            deterministic=deterministic)
    x = x + drop_path(y, deterministic)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.drop_rate, self.dtype,
            self.param_dtype, name='mlp')(norm('norm2')(x), deterministic)
    return x + drop_path(y, deterministic)


class VisionTransformer(nn.Module):
  """DeiT with iRPE, as the release's `VisionTransformer`.

  Example:
    >>> model = irpe_jax.models.create_model(
    ...     'deit_small_patch16_224_ctx_product_50_shared_k')
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    >>> logits = model.apply(params, images)  # images: (B, 224, 224, 3)

  Attributes:
    img_size: training resolution; sets the grid of `pos_embed`. An int or
      `(height, width)`.
    patch_size: side of the square patches.
    in_chans: image channels.
    num_classes: classes of the head; 0 returns the `(B, C)` features.
    embed_dim: `C`, token features.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: hidden size of the MLP over `C`.
    qkv_bias: bias in the qkv projection.
    drop_rate: dropout after the position embedding, in the MLP and after
      the attention projection.
    attn_drop_rate: dropout on the attention weights.
    drop_path_rate: stochastic depth of the last block; block `i` uses
      `drop_path_rate * i / (depth - 1)`, as DeiT.
    rpe_config: an `irpe_jax.RPEConfig` used in every block, or None. Its
      tables need `skip >= 1` and are used with `skip = num_prefix_tokens`
      (see `rpe_config_for_prefix`): a `skip=1` config serves a distilled
      model too.
    distilled: adds the distillation token and the `head_dist` head (DeiT-D).
    use_abs_pos_embed: adds the learnable absolute `pos_embed` (the paper's
      Table 4 switches it off).
    remat: rematerialises each block in the backward pass (`nn.remat`).
    dtype: computation dtype (for example `jnp.bfloat16`); softmax stays
      float32.
    param_dtype: parameter dtype.
    impl: iRPE lookup implementation, see `irpe_jax.ops`.
    attention_impl: 'materialized', 'blockwise', 'pallas' or 'auto' (see
      `irpe_jax.attention.resolve_attention_impl`).
  """
  img_size: Union[int, Tuple[int, int]] = 224
  patch_size: int = 16
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = SIZES['base']['embed_dim']
  depth: int = 12
  num_heads: int = SIZES['base']['num_heads']
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  rpe_config: Optional[config_lib.RPEConfig] = None
  distilled: bool = False
  use_abs_pos_embed: bool = True
  remat: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  impl: str = 'auto'
  attention_impl: str = 'auto'

  @property
  def num_prefix_tokens(self) -> int:
    """Leading non-spatial tokens: the class token and the distillation one."""
    return 2 if self.distilled else 1

  @property
  def grid_size(self) -> Tuple[int, int]:
    """`(rows, cols)` of the patch grid at `img_size`."""
    size = self.img_size
    if isinstance(size, (tuple, list)) and len(size) == 2:
      rows, cols = (_checks.check_int(f'img_size[{i}]', s, 1)
                    for i, s in enumerate(size))
    else:
      rows = cols = _checks.check_int('img_size', size, 1)
    patch = _checks.check_int('patch_size', self.patch_size, 1)
    return rows // patch, cols // patch

  def _check(self, images):
    for name, minimum in (('patch_size', 1), ('in_chans', 1),
                          ('embed_dim', 1), ('depth', 0), ('num_heads', 1),
                          ('num_classes', 0)):
      _checks.check_int(name, getattr(self, name), minimum)
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim={self.embed_dim} is not divisible by '
                       f'num_heads={self.num_heads}.')
    if self.rpe_config is not None and not isinstance(self.rpe_config,
                                                      config_lib.RPEConfig):
      raise TypeError(f'rpe_config must be an RPEConfig (see '
                      f'irpe_jax.get_rpe_config), got {self.rpe_config!r}.')
    if images.ndim != 4 or images.shape[-1] != self.in_chans:
      raise ValueError(f'images must be NHWC (B, H, W, {self.in_chans}), got '
                       f'shape {images.shape}.')
    rows, cols = images.shape[1:3]
    if rows < self.patch_size or cols < self.patch_size:
      raise ValueError(f'images of {rows}x{cols} pixels are smaller than one '
                       f'{self.patch_size}x{self.patch_size} patch.')

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
    """Classifies `(B, H, W, in_chans)` images.

    Args:
      images: NHWC images; `H` and `W` need not be `img_size` (pixels past
        the last whole patch are dropped, as a strided conv does).
      train: enables dropout and stochastic depth (rng 'dropout').

    Returns:
      `(B, num_classes)` logits. A distilled model returns, as DeiT and the
      release do, the tuple `(class_logits, dist_logits)` when `train` and
      their average otherwise. The attention weights of block `i` are sown
      as `intermediates/blocks_{i}/attn/attention_weights`.
    """
    self._check(images)
    rpe_config = rpe_config_for_prefix(self.rpe_config,
                                       self.num_prefix_tokens)
    deterministic = not train
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype,
                   self.param_dtype, name='patch_embed')(images)
    batch, rows, cols, features = x.shape
    x = x.reshape(batch, rows * cols, features)
    prefix = [self.param('cls_token', _token_init, (1, 1, features),
                         self.param_dtype)]
    if self.distilled:
      prefix.append(self.param('dist_token', _token_init, (1, 1, features),
                               self.param_dtype))
    prefix = [jnp.broadcast_to(t, (batch, 1, features)).astype(x.dtype)
              for t in prefix]
    x = jnp.concatenate(prefix + [x], axis=1)
    if self.use_abs_pos_embed:
      trained = self.grid_size
      posemb = self.param(
          'pos_embed', _token_init,
          (1, self.num_prefix_tokens + trained[0] * trained[1], features),
          self.param_dtype)
      x = x + resample_posemb(posemb, (rows, cols), self.num_prefix_tokens,
                              trained).astype(x.dtype)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)

    block_cls = (nn.remat(Block, static_argnums=(2, 3, 4)) if self.remat
                 else Block)
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = block_cls(
          num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias, drop_rate=self.drop_rate,
          attn_drop_rate=self.attn_drop_rate, drop_path_rate=rate,
          rpe_config=rpe_config, dtype=self.dtype,
          param_dtype=self.param_dtype, impl=self.impl,
          attention_impl=self.attention_impl,
          name=f'blocks_{i}')(x, rows, cols, deterministic)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='norm')(x)
    if self.num_classes == 0:
      return x[:, 0]
    head = lambda name: nn.Dense(self.num_classes, dtype=self.dtype,
                                 param_dtype=self.param_dtype,
                                 kernel_init=_dense_init, name=name)
    logits = head('head')(x[:, 0])
    if not self.distilled:
      return logits
    dist_logits = head('head_dist')(x[:, 1])
    if train:
      return logits, dist_logits
    return (logits + dist_logits) / 2
