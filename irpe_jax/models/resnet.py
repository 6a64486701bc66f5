"""Bottleneck ResNets with frozen batch norm: the body of DETR's backbone.

torchvision's ResNet (v1.5: the stride sits on the 3x3 conv of a bottleneck)
with DETR's `FrozenBatchNorm2d` (Carion et al., ECCV 2020, `models/
backbone.py`), so that torchvision's ImageNet weights and the iRPE release's
DETR checkpoints convert one to one (see `irpe_jax.convert`). Names follow
torchvision: `conv1`, `bn1`, `layer{1..4}_{i}/{conv1, bn1, conv2, bn2, conv3,
bn3, downsample_0, downsample_1}`.

Besides torchvision's ResNet-50/101, `resnet14` (one bottleneck per stage)
and a narrower `width` make a backbone small enough to train DETR from
scratch on a CPU, for tests and the offline demo; they have no released
weights.

Convolutions pad as PyTorch does, the same amount on every side (`k // 2`),
not Flax's 'SAME', which pads a stride-2 layer on an even input only at the
bottom and right and so shifts every feature by half a pixel.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# Bottleneck blocks per stage (He et al. 2016, Table 1).
DEPTHS = {
    'resnet14': (1, 1, 1, 1),  # 1 + 4 * 3 convs + the (absent) fc.
    'resnet50': (3, 4, 6, 3),
    'resnet101': (3, 4, 23, 3),
}
EXPANSION = 4  # output channels of a bottleneck over its width.
# torchvision's init: kaiming-normal, fan-out, ReLU gain.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine, as DETR's `FrozenBatchNorm2d`.

  All four tensors are buffers in the 'batch_stats' collection (`scale`,
  `bias`, `mean`, `var`; the release's `weight`, `bias`, `running_mean`,
  `running_var`), so an optimizer over 'params' never touches them.
  `y = x * scale' + (bias - mean * scale')` with
  `scale' = scale / sqrt(var + epsilon)`, over the last axis.

  Attributes:
    epsilon: added to the variance; DETR's 1e-5.
    dtype: computation dtype; default the input's.
    param_dtype: dtype of the buffers.
  """
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`(..., C)` -> `(..., C)`."""
    channels = x.shape[-1]
    buffer = lambda name, fill: self.variable(
        'batch_stats', name, lambda: jnp.full((channels,), fill,
                                              self.param_dtype)).value
    scale, bias = buffer('scale', 1.0), buffer('bias', 0.0)
    mean, var = buffer('mean', 0.0), buffer('var', 1.0)
    dtype = self.dtype or x.dtype
    # Folded in float32 (the release's order), then applied in `dtype`.
    scale = scale * jax.lax.rsqrt(var + self.epsilon)
    bias = bias - mean * scale
    return x.astype(dtype) * scale.astype(dtype) + bias.astype(dtype)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any,
          param_dtype: Any, dilation: int = 1) -> nn.Conv:
  """A bias-free conv padded `dilation * (kernel // 2)` a side, as PyTorch's."""
  pad = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation), use_bias=False,
                 kernel_init=_conv_init, dtype=dtype, param_dtype=param_dtype,
                 name=name)


class Bottleneck(nn.Module):
  """torchvision's `Bottleneck`: 1x1, 3x3 (strided), 1x1 and a shortcut.

  Attributes:
    width: channels of the 3x3 conv; the block outputs `4 * width`.
    stride: stride of the 3x3 conv and of the projection shortcut.
    downsample: projects the shortcut with a strided 1x1 conv and a norm
      (`downsample_0`, `downsample_1`).
    dilation: dilation (and padding) of the 3x3 conv.
  """
  width: int
  stride: int = 1
  downsample: bool = False
  dilation: int = 1
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s, name: _conv(f, k, s, name, self.dtype,
                                       self.param_dtype)
    norm = lambda name: FrozenBatchNorm(dtype=self.dtype,
                                        param_dtype=self.param_dtype,
                                        name=name)
    out = nn.relu(norm('bn1')(conv(self.width, 1, 1, 'conv1')(x)))
    out = nn.relu(norm('bn2')(_conv(self.width, 3, self.stride, 'conv2',
                                    self.dtype, self.param_dtype,
                                    self.dilation)(out)))
    out = norm('bn3')(conv(self.width * EXPANSION, 1, 1, 'conv3')(out))
    shortcut = x
    if self.downsample:
      shortcut = norm('downsample_1')(conv(
          self.width * EXPANSION, 1, self.stride, 'downsample_0')(x))
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """torchvision's ResNet up to `layer4` (no pooling, no `fc`).

  Attributes:
    depths: bottlenecks per stage; `DEPTHS['resnet50']` by default.
    width: channels of the stem and of the first stage's 3x3 convs,
      doubled at each stage; torchvision's 64.
    dtype: computation dtype.
    param_dtype: parameter and buffer dtype.
    dilate_last: the last stage trades its stride for dilation
      (torchvision's `replace_stride_with_dilation=[False, False, True]`,
      DETR's DC5): output stride 16 instead of 32, same parameters.
  """
  depths: Tuple[int, ...] = DEPTHS['resnet50']
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  width: int = 64
  dilate_last: bool = False

  @property
  def stride(self) -> int:
    """Pixels per output position."""
    return 16 if self.dilate_last else 32

  @property
  def num_channels(self) -> int:
    """Channels of the `layer4` output."""
    return self.width * 2 ** (len(self.depths) - 1) * EXPANSION

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """`(B, H, W, 3)` -> `(B, ceil(H / stride), ceil(W / stride), C)`."""
    x = _conv(self.width, 7, 2, 'conv1', self.dtype, self.param_dtype)(images)
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                name='bn1')(x))
    # Padding takes part in the max as -inf, as in PyTorch's MaxPool2d.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_channels = self.width
    for stage, blocks in enumerate(self.depths):
      width = self.width * 2 ** stage
      dilated = self.dilate_last and stage == len(self.depths) - 1
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 and not dilated else 1
        # torchvision: a dilated stage's first block keeps the previous
        # dilation (1); the blocks after it dilate by the stride it dropped.
        dilation = 2 if dilated and i > 0 else 1
        x = Bottleneck(
            width, stride,
            downsample=i == 0 and (stride != 1
                                   or in_channels != width * EXPANSION),
            dilation=dilation, dtype=self.dtype, param_dtype=self.param_dtype,
            name=f'layer{stage + 1}_{i}')(x)
        in_channels = width * EXPANSION
    return x
