"""DETR with iRPE in the encoder, as the iRPE release's `DETR-with-iRPE`.

Carion et al. (ECCV 2020) detect with a ResNet, a transformer and 100
object queries; Wu et al. (ICCV 2021, Sec. 4.3) put contextual product iRPE
on the keys of every encoder self-attention, keeping DETR's sine position
encoding: 39.5 -> 41.0 AP on COCO at 150 epochs for ResNet-50. The module
tree and names follow the release, so its checkpoints convert one to one
(`irpe_jax.convert.load_torch_checkpoint('detr_irpe.pth', model)`):
`backbone_0/body` (ResNet, frozen batch norm in 'batch_stats'),
`input_proj`, `transformer/{encoder, decoder}`, `query_embed`,
`class_embed`, `bbox_embed/layers_{0,1,2}`.

Images come as a padded batch: `images (B, H, W, 3)` and `pixel_mask
(B, H, W)`, True on the padding at the bottom and right of each smaller
image (the release's `NestedTensor`). iRPE runs on the padded feature map,
whose valid part sits top-left, so the offsets between valid tokens are
those of the unpadded image.
"""

import math
from typing import Any, Dict, Optional, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import _checks
from irpe_jax import config as config_lib
from irpe_jax import initializers
from irpe_jax.models import detr_transformer
from irpe_jax.models import params as params_lib
from irpe_jax.models import resnet

Variables = Dict[str, Any]
# The release's `RPE_HELP`: ratio -> buckets of the product method.
RPE_HELP = ("enc_rpe2d must be '' (plain DETR) or "
            "'rpe-RATIO-METHOD-MODE-SHARED-ON', e.g. 'rpe-2.0-product-ctx-1-k' "
            '(ratio 1.9: 49 product buckets, 2.0: 81, 2.5: 121, 3.0: 169)')
RPE_TABLE_INITS = {
    # The release's `Transformer._reset_parameters`: xavier-uniform on every
    # tensor of 2+ dims, the 3-D tables with PyTorch's fans.
    'xavier_uniform': initializers.torch_xavier_uniform(),
    # The paper's and DeiT-iRPE's default.
    'zeros': nn.initializers.zeros_init(),
}
# PyTorch's default Linear / Conv2d init (kaiming-uniform with a = sqrt(5)).
_torch_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in',
                                                      'uniform')


def parse_enc_rpe2d(spec: Union[str, config_lib.RPEConfig, None]
                    ) -> Optional[config_lib.RPEConfig]:
  """The encoder's iRPE: None for '' or None, else the release's string.

  Raises:
    ValueError: naming `spec` and the expected format if it does not parse
      or asks for skip tokens (DETR's feature map has none).
  """
  if spec is None or isinstance(spec, config_lib.RPEConfig):
    config = spec
  elif isinstance(spec, str):
    if not spec:
      return None
    try:
      config = config_lib.parse_rpe_string(spec)
    except ValueError as e:
      raise ValueError(f'enc_rpe2d={spec!r}: {e} {RPE_HELP}.') from None
  else:
    raise TypeError(f'enc_rpe2d must be a string or an RPEConfig, got '
                    f'{type(spec).__name__}.')
  singles = () if config is None else (config.rpe_q, config.rpe_k,
                                        config.rpe_v)
  if any(c is not None and c.skip for c in singles):
    raise ValueError(f'enc_rpe2d: DETR has no skip tokens; got {config}.')
  return config


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source indices of PyTorch's `F.interpolate(mode='nearest')`, one axis.

  `min(floor(dst * (in / out)), in - 1)` in float32, as PyTorch computes
  them (`nearest_idx` in `UpSample.h`); not the half-pixel rule of
  `jax.image.resize`.
  """
  scale = np.float32(size_in) / np.float32(size_out)
  index = np.floor(np.arange(size_out, dtype=np.float32) * scale)
  return np.minimum(index.astype(np.int64), size_in - 1)


def shrink_mask(mask: jax.Array, height: int, width: int) -> jax.Array:
  """`(B, H, W)` bool -> `(B, height, width)` by nearest interpolation."""
  rows = nearest_indices(mask.shape[1], height)
  cols = nearest_indices(mask.shape[2], width)
  return mask[:, rows][:, :, cols]


def sine_position_encoding(mask: jax.Array, num_pos_feats: int = 128,
                           temperature: float = 10000.0,
                           scale: float = 2 * math.pi,
                           eps: float = 1e-6) -> jax.Array:
  """DETR's `PositionEmbeddingSine(normalize=True)` of a padding mask.

  The row (column) coordinate of a pixel is the count of valid pixels above
  (left of) it, inclusive, divided by the valid height (width) of its image
  and scaled to `(0, scale]`; each is encoded by `num_pos_feats`
  interleaved sines and cosines.

  Args:
    mask: `(B, h, w)` bool, True = padding.
    num_pos_feats: features per axis; the output has twice as many.
    temperature: wavelength base.
    scale: range of the normalised coordinates.
    eps: keeps an all-padding row or column finite.

  Returns:
    `(B, h, w, 2 * num_pos_feats)` float32: the y features, then the x ones.
  """
  valid = (~mask).astype(jnp.float32)
  y = jnp.cumsum(valid, axis=1)
  x = jnp.cumsum(valid, axis=2)
  y = y / (y[:, -1:, :] + eps) * scale
  x = x / (x[:, :, -1:] + eps) * scale
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(
      num_pos_feats))

  def encode(coord):
    pos = coord[..., None] / dim_t
    pos = jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])],
                    axis=-1)
    return pos.reshape(pos.shape[:3] + (num_pos_feats,))

  return jnp.concatenate([encode(y), encode(x)], axis=-1)


class Backbone(nn.Module):
  """The release's `Backbone`: the ResNet `body` and the shrunk mask.

  Attributes:
    arch: a key of `resnet.DEPTHS` ('resnet50', 'resnet101', 'resnet14').
    width: the ResNet's `width` (torchvision's 64).
    dilation: dilate the last stage (DC5, stride 16).
  """
  arch: str = 'resnet50'
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  width: int = 64
  dilation: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, pixel_mask: jax.Array
               ) -> Tuple[jax.Array, jax.Array]:
    """Images `(B, H, W, 3)`, mask `(B, H, W)` -> `(B, h, w, C)`, `(B, h, w)`.
    """
    features = resnet.ResNet(resnet.DEPTHS[self.arch], self.dtype,
                             self.param_dtype, self.width, self.dilation,
                             name='body')(images)
    return features, shrink_mask(pixel_mask, *features.shape[1:3])


class MLP(nn.Module):
  """`layers_{i}` Linear layers with ReLU between them (DETR's `MLP`)."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(
          self.output_dim if last else self.hidden_dim,
          kernel_init=_torch_kernel_init,
          bias_init=detr_transformer.torch_linear_bias_init(x.shape[-1]),
          dtype=self.dtype, param_dtype=self.param_dtype,
          name=f'layers_{i}')(x)
      if not last:
        x = nn.relu(x)
    return x


class DETR(nn.Module):
  """DETR with iRPE in the encoder self-attention.

  Example:
    >>> model = irpe_jax.models.DETR()  # rpe-2.0-product-ctx-1-k, ResNet-50
    >>> variables = convert.load_torch_checkpoint('detr_irpe.pth', model)
    >>> out = model.apply(variables, images, pixel_mask)
    >>> out['pred_logits'].shape, out['pred_boxes'].shape
    ((B, 100, 92), (B, 100, 4))

  Attributes:
    num_classes: object classes (COCO's 91 ids); the logits have one more,
      the last being "no object".
    num_queries: object queries.
    enc_rpe2d: iRPE of the encoder as the release writes it,
      `'rpe-RATIO-METHOD-MODE-SHARED-ON'` ('' for plain DETR), or an
      `RPEConfig` with `skip=0`.
    hidden_dim: transformer features.
    num_heads: attention heads.
    enc_layers: encoder layers.
    dec_layers: decoder layers.
    dim_feedforward: hidden size of the feed-forward networks.
    dropout_rate: transformer dropout (the release's 0.1).
    aux_loss: also return the predictions of decoder layers 1..L-1.
    backbone: 'resnet50' or 'resnet101' (the release's), or 'resnet14'
      (one bottleneck per stage, no released weights: for training from
      scratch on a CPU).
    backbone_width: the ResNet's stem width, doubled per stage; 64 as
      torchvision (released weights need 64), e.g. 8 for a tiny model.
    dilation: the release's `--dilation` (DETR-DC5): the backbone's last
      stage dilated instead of strided, so the encoder sees a feature map
      of stride 16, four times the tokens. Same parameters.
    rpe_table_init: 'xavier_uniform' (the release) or 'zeros', or an
      initializer.
    impl: iRPE lookup implementation, see `irpe_jax.ops`.
    attention_impl: 'materialized', 'blockwise', 'pallas' or 'auto' (see
      `irpe_jax.attention.resolve_attention_impl`).
    remat: rematerialises each transformer layer in the backward pass.
    dtype: computation dtype (softmax stays float32).
    param_dtype: parameter dtype.
  """
  num_classes: int = 91
  num_queries: int = 100
  enc_rpe2d: Union[str, config_lib.RPEConfig, None] = (
      'rpe-2.0-product-ctx-1-k')
  hidden_dim: int = 256
  num_heads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  dim_feedforward: int = 2048
  dropout_rate: float = 0.1
  aux_loss: bool = True
  backbone: str = 'resnet50'
  backbone_width: int = 64
  dilation: bool = False
  rpe_table_init: Any = 'xavier_uniform'
  impl: str = 'auto'
  attention_impl: str = 'auto'
  remat: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  # Where torchvision's ResNet weights go (see `irpe_jax.convert`).
  backbone_path = ('backbone_0', 'body')

  @property
  def rpe_config(self) -> Optional[config_lib.RPEConfig]:
    """The encoder's `RPEConfig` (None for plain DETR)."""
    return parse_enc_rpe2d(self.enc_rpe2d)

  @nn.nowrap
  def example_inputs(self, height: int = 64, width: int = 64
                     ) -> Tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shapes of a small batch (`init` needs no detection-size images)."""
    return (jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, height, width), jnp.bool_))

  def _check(self, images, pixel_mask):
    for name, minimum in (('num_classes', 1), ('num_queries', 1),
                          ('hidden_dim', 4), ('num_heads', 1),
                          ('enc_layers', 0), ('dec_layers', 1),
                          ('dim_feedforward', 1), ('backbone_width', 1)):
      _checks.check_int(name, getattr(self, name), minimum)
    # The sine encoding interleaves sin and cos over hidden_dim / 2 features.
    if self.hidden_dim % self.num_heads or self.hidden_dim % 4:
      raise ValueError(f'hidden_dim={self.hidden_dim} must be divisible by 4 '
                       f'and by num_heads={self.num_heads}.')
    if self.backbone not in resnet.DEPTHS:
      raise ValueError(f'backbone={self.backbone!r}; expected one of '
                       f'{sorted(resnet.DEPTHS)}.')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be NHWC (B, H, W, 3), got shape '
                       f'{images.shape}.')
    if pixel_mask.shape != images.shape[:3] or pixel_mask.dtype != jnp.bool_:
      raise ValueError(f'pixel_mask must be bool (B, H, W) = '
                       f'{images.shape[:3]} (True = padding), got '
                       f'{pixel_mask.dtype} {pixel_mask.shape}.')

  def _table_init(self):
    init = self.rpe_table_init
    if callable(init):
      return init
    if init not in RPE_TABLE_INITS:
      raise ValueError(f'rpe_table_init={init!r}; expected one of '
                       f'{sorted(RPE_TABLE_INITS)} or an initializer.')
    return RPE_TABLE_INITS[init]

  @nn.compact
  def __call__(self, images: jax.Array, pixel_mask: Optional[jax.Array] = None,
               *, deterministic: bool = True) -> Dict[str, Any]:
    """Detects objects in a padded batch of images.

    Args:
      images: `(B, H, W, 3)` normalised images (ImageNet mean and std),
        each padded at the bottom and right to the batch's `H x W`.
      pixel_mask: `(B, H, W)` bool, True on padding; default none.
      deterministic: disables dropout when True (needs rng 'dropout' when
        False).

    Returns:
      `pred_logits (B, Q, num_classes + 1)`, `pred_boxes (B, Q, 4)`
      (cx, cy, w, h relative to the image without padding, in [0, 1]) and,
      with `aux_loss`, `aux_outputs`: such a dict for each decoder layer
      but the last. The `layer4` features `(B, h, w, C)` and the encoder
      output `(B, h * w, hidden_dim)` are sown as
      `intermediates/backbone_features` and `intermediates/encoder_memory`.
    """
    if pixel_mask is None:
      pixel_mask = jnp.zeros(images.shape[:3], jnp.bool_)
    self._check(images, pixel_mask)
    rpe_config = self.rpe_config
    features, mask = Backbone(self.backbone, self.dtype, self.param_dtype,
                              self.backbone_width, self.dilation,
                              name='backbone_0')(images, pixel_mask)
    self.sow('intermediates', 'backbone_features', features)
    pos = sine_position_encoding(mask, self.hidden_dim // 2)
    src = nn.Conv(self.hidden_dim, (1, 1), kernel_init=_torch_kernel_init,
                  bias_init=detr_transformer.torch_linear_bias_init(
                      features.shape[-1]),
                  dtype=self.dtype, param_dtype=self.param_dtype,
                  name='input_proj')(features)
    query_embed = nn.Embed(self.num_queries, self.hidden_dim,
                           embedding_init=nn.initializers.normal(1.0),
                           param_dtype=self.param_dtype, name='query_embed')
    hs, memory = detr_transformer.Transformer(
        num_heads=self.num_heads, enc_layers=self.enc_layers,
        dec_layers=self.dec_layers, dim_feedforward=self.dim_feedforward,
        dropout_rate=self.dropout_rate, rpe_config=rpe_config,
        rpe_table_init=self._table_init(), impl=self.impl,
        attention_impl=self.attention_impl, remat=self.remat,
        dtype=self.dtype, param_dtype=self.param_dtype, name='transformer')(
            src, mask, query_embed.embedding, pos,
            deterministic=deterministic)
    self.sow('intermediates', 'encoder_memory', memory)
    logits = nn.Dense(
        self.num_classes + 1, kernel_init=_torch_kernel_init,
        bias_init=detr_transformer.torch_linear_bias_init(self.hidden_dim),
        dtype=self.dtype, param_dtype=self.param_dtype,
        name='class_embed')(hs)
    boxes = nn.sigmoid(MLP(self.hidden_dim, 4, 3, self.dtype,
                           self.param_dtype, name='bbox_embed')(hs))
    out = {'pred_logits': logits[-1], 'pred_boxes': boxes[-1]}
    if self.aux_loss:
      out['aux_outputs'] = [{'pred_logits': l, 'pred_boxes': b}
                            for l, b in zip(logits[:-1], boxes[:-1])]
    return out


def init_variables(model: DETR, rng: jax.Array,
                   backbone: Optional[Variables] = None) -> Variables:
  """Initialised variables of `model`, optionally with a loaded backbone.

  Initialises at `model.example_inputs()` (a small image: the variables do
  not depend on the image size).

  Args:
    model: the DETR.
    rng: PRNG key of the initialisation.
    backbone: variables of the backbone only, e.g. torchvision's ImageNet
      ResNet-50 from `convert.load_torch_checkpoint('resnet50.pth', model)`,
      to train from as the release does.

  Returns:
    The model's variables,
    `{'params': ..., 'batch_stats': ...}`.
  """
  inputs = [jnp.zeros(x.shape, x.dtype) for x in model.example_inputs()]
  variables = flax.core.unfreeze(
      params_lib.jitted_init(model)(rng, *inputs))
  if backbone is not None:
    variables = replace_backbone(model, variables, backbone)
  return variables


def replace_backbone(model: DETR, variables: Variables,
                     backbone: Variables) -> Variables:
  """`variables` with the backbone taken from `backbone`.

  Raises:
    ValueError: if `backbone` holds anything but the whole backbone of
      `model` with the same shapes.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  new = flax.traverse_util.flatten_dict(flax.core.unfreeze(backbone))
  prefix = model.backbone_path
  inside = lambda path: path[1:1 + len(prefix)] == prefix
  want = {p for p in flat if inside(p)}
  problems = sorted('/'.join(p) for p in want ^ set(new))
  problems += sorted(f'{"/".join(p)}: {np.shape(v)} for {np.shape(flat[p])}'
                     for p, v in new.items()
                     if p in want and np.shape(v) != np.shape(flat[p]))
  if problems:
    raise ValueError('backbone does not fit the model: '
                     + ', '.join(problems) + '.')
  flat.update(new)
  return flax.traverse_util.unflatten_dict(flat)


def param_labels(params: Any) -> Any:
  """Labels the release's optimizer groups, for `optax.multi_transform`.

  DETR trains the backbone at its own learning rate (the release: 1e-5, the
  rest 1e-4) and freezes its stem and `layer1` (`BackboneBase` of DETR).

  Returns:
    A tree like `params` of 'frozen' (stem, `layer1`), 'backbone' (the
    other ResNet stages) and 'transformer' (everything else).
  """
  def label(path, _):
    names = [getattr(k, 'key', str(k)) for k in path]
    if names[:2] != list(DETR.backbone_path):
      return 'transformer'
    stage = names[2] if len(names) > 2 else ''
    trained = stage.split('_')[0] in ('layer2', 'layer3', 'layer4')
    return 'backbone' if trained else 'frozen'
  return jax.tree_util.tree_map_with_path(label, params)
