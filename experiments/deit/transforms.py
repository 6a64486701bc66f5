"""Per-example image transforms of the DeiT recipe, as the release runs them.

The release (DeiT's `main.py` and `datasets.py`, with timm 0.3) trains with
timm's `create_transform`: bicubic random resized crop, flip,
RandAugment `rand-m9-mstd0.5-inc1` (bicubic, filled with the ImageNet mean),
normalisation and random erasing in 'pixel' mode; it evaluates with
torchvision's `Resize(int(size / 0.875), bicubic)` + `CenterCrop(size)`.
Each function here is one of those steps on a PIL image or a numpy array:
pure numpy and Pillow, no JAX.
"""

import math
from typing import Any, Callable, Dict, Tuple

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from experiments.lib import image_decode
from irpe_jax import _checks

IMAGENET_MEAN = image_decode.IMAGENET_MEAN
IMAGENET_STD = image_decode.IMAGENET_STD
normalize = image_decode.normalize
# timm's `img_mean` fill of RandAugment: round(255 * mean).
FILL_RGB = tuple(int(round(255 * float(m))) for m in IMAGENET_MEAN)
MODES = ('L', 'RGB', 'RGBA')


def to_pil(image: np.ndarray) -> Image.Image:
  """uint8 `(H, W)` or `(H, W, C)` with C in 1..4 -> RGB PIL image.

  Grey images are repeated to three channels, an alpha channel is dropped.

  Raises:
    ValueError: for another dtype, rank, channel count or an empty image.
  """
  image = np.asarray(image)
  if (image.dtype != np.uint8 or image.ndim not in (2, 3) or 0 in image.shape
      or (image.ndim == 3 and image.shape[-1] not in (1, 2, 3, 4))):
    raise ValueError(f'image must be uint8 (H, W) or (H, W, C) with C in 1..4, '
                     f'got {image.dtype} {image.shape}.')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image).convert('RGB')


def _resized_size(width: int, height: int, short: int) -> Tuple[int, int]:
  # torchvision's Resize(int): the shorter side becomes `short`, the longer
  # one `int(short * long / shorter)` (truncated).
  if width <= height:
    return short, int(short * height / width)
  return int(short * width / height), short


def center_crop(image: Image.Image, size: int,
                crop_fraction: float = 0.875) -> Image.Image:
  """DeiT eval: `Resize(int(size / crop_fraction), bicubic)`, `CenterCrop`.

  The crop offsets are torchvision's, `int(round((resized - size) / 2))`
  (round half to even).

  Args:
    image: PIL image of any size.
    size: side of the square output.
    crop_fraction: share of the resized shorter side that is kept, in (0, 1].

  Returns:
    A `size` x `size` PIL image of the same mode.
  """
  size = _checks.check_int('size', size, 1)
  crop_fraction = _checks.check_number('crop_fraction', crop_fraction,
                                       minimum=0.0, maximum=1.0,
                                       exclusive_minimum=True)
  resized = _resized_size(*image.size, int(size / crop_fraction))
  if resized != image.size:
    image = image.resize(resized, Image.Resampling.BICUBIC)
  left = int(round((resized[0] - size) / 2.0))
  top = int(round((resized[1] - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def _check_range(name: str, value: Any, minimum: float) -> Tuple[float, float]:
  """`(low, high)` with `minimum < low <= high`, or a ValueError naming it."""
  if len(value) != 2:
    raise ValueError(f'{name} must be (low, high), got {value!r}.')
  low, high = (_checks.check_number(f'{name}[{i}]', v, minimum=minimum,
                                    exclusive_minimum=True)
               for i, v in enumerate(value))
  if low > high:
    raise ValueError(f'{name} must be (low, high) with low <= high, got '
                     f'{tuple(value)}.')
  return low, high


def random_resized_crop(image: Image.Image, size: int,
                        rng: np.random.Generator,
                        scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> Image.Image:
  """timm's `RandomResizedCropAndInterpolation` (bicubic).

  Ten tries at a crop of random area share and log-uniform aspect; if none
  fits, the centred crop of the whole image with its aspect clamped to
  `ratio`. The crop is then resized (not aspect-preserving) to `size`.

  Args:
    image: PIL image, at least 1x1.
    size: side of the square output.
    rng: random generator of this example.
    scale: range of the crop's share of the image area.
    ratio: range of the crop's aspect (width / height).

  Returns:
    A `size` x `size` PIL image.
  """
  size = _checks.check_int('size', size, 1)
  scale = _check_range('scale', scale, 0.0)
  ratio = _check_range('ratio', ratio, 0.0)
  width, height = image.size
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    # `0 <`: on tiny images the rounded crop can be empty (timm would crash).
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      break
  else:
    aspect = width / height
    if aspect < ratio[0]:
      w, h = width, max(1, min(height, int(round(width / ratio[0]))))
    elif aspect > ratio[1]:
      w, h = max(1, min(width, int(round(height * ratio[1])))), height
    else:
      w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
  return image.crop((left, top, left + w, top + h)).resize(
      (size, size), Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------
# RandAugment ops as timm's `_RAND_INCREASING_TRANSFORMS` ('inc1'). Each takes
# an 'L', 'RGB' or 'RGBA' image and a signed strength `m` in [-1, 1]
# (magnitude / 10; the sign is the direction of the ops that have one) and
# returns an image of the same size and mode.


def _colour_op(fn: Callable[[Image.Image, float], Image.Image]
               ) -> Callable[[Image.Image, float], Image.Image]:
  """Runs a per-pixel colour op on the colour bands; alpha is kept."""
  def op(image: Image.Image, m: float) -> Image.Image:
    if image.mode != 'RGBA':
      return fn(image, m)
    out = fn(image.convert('RGB'), m).convert('RGBA')
    out.putalpha(image.getchannel('A'))
    return out
  return op


def _lut(image: Image.Image, table) -> Image.Image:
  return image.point(list(table) * len(image.getbands()))


def posterize(image: Image.Image, bits: int) -> Image.Image:
  """Keeps the `bits` (0 to 8) most significant bits of each band.

  timm's `PosterizeIncreasing` reaches 0 bits at full strength, which the
  release's Pillow turned into a black image and Pillow >= 10 rejects; the
  lookup table here is Pillow's for 1..8 and that black image for 0.
  """
  bits = _checks.check_int('bits', bits, 0, 8)
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return _lut(image, (i & mask for i in range(256)))


def solarize(image: Image.Image, threshold: int) -> Image.Image:
  """Inverts the values >= `threshold` (0: all, 256: none), as Pillow's."""
  return _lut(image, (i if i < threshold else 255 - i for i in range(256)))


def solarize_add(image: Image.Image, add: int,
                 threshold: int = 128) -> Image.Image:
  """Adds `add` to the values below `threshold`, saturating at 255 (timm)."""
  return _lut(image, (min(255, i + add) if i < threshold else i
                      for i in range(256)))


def _geometric_op(fn: Callable[[Image.Image, float, Any], Image.Image]
                  ) -> Callable[[Image.Image, float], Image.Image]:
  """Runs `fn(image, m, fill)` with the ImageNet-mean fill of the mode.

  RGBA is moved as colour and alpha apart (the alpha filled opaque): Pillow
  would resample it premultiplied, which changes the colour of transparent
  pixels, and the pipeline keeps colour, not alpha (`to_pil`).
  """
  def op(image: Image.Image, m: float) -> Image.Image:
    if image.mode == 'L':
      grey = Image.new('RGB', (1, 1), FILL_RGB).convert('L').getpixel((0, 0))
      return fn(image, m, grey)
    if image.mode != 'RGBA':
      return fn(image, m, FILL_RGB)
    out = fn(image.convert('RGB'), m, FILL_RGB)
    out.putalpha(fn(image.getchannel('A'), m, 255))
    return out
  return op


def _affine(matrix: Callable[[Image.Image, float], Tuple[float, ...]]
            ) -> Callable[[Image.Image, float], Image.Image]:
  return _geometric_op(lambda im, m, fill: im.transform(
      im.size, Image.Transform.AFFINE, matrix(im, m),
      resample=Image.Resampling.BICUBIC, fillcolor=fill))


def _enhance(enhancer) -> Callable[[Image.Image, float], Image.Image]:
  # 'Increasing' enhance ops: factor 1 +- 0.9 m, i.e. in [0.1, 1.9].
  return _colour_op(lambda im, m: enhancer(im).enhance(1.0 + 0.9 * m))


RAND_AUGMENT_OPS: Dict[str, Callable[[Image.Image, float], Image.Image]] = {
    'AutoContrast': _colour_op(lambda im, m: ImageOps.autocontrast(im)),
    'Equalize': _colour_op(lambda im, m: ImageOps.equalize(im)),
    'Invert': _colour_op(lambda im, m: ImageOps.invert(im)),
    'Rotate': _geometric_op(lambda im, m, fill: im.rotate(
        30 * m, resample=Image.Resampling.BICUBIC, fillcolor=fill)),
    'PosterizeIncreasing': _colour_op(
        lambda im, m: posterize(im, 4 - int(abs(m) * 4))),
    'SolarizeIncreasing': _colour_op(
        lambda im, m: solarize(im, 256 - int(abs(m) * 256))),
    'SolarizeAdd': _colour_op(lambda im, m: solarize_add(im,
                                                         int(abs(m) * 110))),
    'ColorIncreasing': _enhance(ImageEnhance.Color),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': _affine(lambda im, m: (1, 0.3 * m, 0, 0, 1, 0)),
    'ShearY': _affine(lambda im, m: (1, 0, 0, 0.3 * m, 1, 0)),
    'TranslateXRel': _affine(lambda im, m: (1, 0, 0.45 * m * im.size[0], 0, 1,
                                            0)),
    'TranslateYRel': _affine(lambda im, m: (1, 0, 0, 0, 1,
                                            0.45 * m * im.size[1])),
}


def rand_augment(image: Image.Image, rng: np.random.Generator,
                 num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5
                 ) -> Image.Image:
  """RandAugment (Cubuk et al. 2020) as timm's `rand-m9-mstd0.5-inc1`.

  Args:
    image: 'L', 'RGB' or 'RGBA' PIL image.
    rng: random generator of this example.
    num_ops: ops applied in sequence, each drawn uniformly (with repeats).
    magnitude: strength out of 10; larger values are clipped to 10 after the
      jitter, as timm's default `magnitude_max`.
    magnitude_std: std of a Gaussian jitter of the magnitude per op; `inf`
      draws it uniformly from `[0, magnitude]` (timm's `mstd101`).
    prob: probability of applying each drawn op.

  Returns:
    The augmented image, same size and mode.
  """
  if image.mode not in MODES:
    raise ValueError(f'rand_augment takes an image of mode {MODES}, got '
                     f'{image.mode!r}.')
  num_ops = _checks.check_int('num_ops', num_ops, 0)
  magnitude = _checks.check_number('magnitude', magnitude, minimum=0.0)
  prob = _checks.check_number('prob', prob, minimum=0.0, maximum=1.0)
  if not magnitude_std >= 0:  # Also refuses NaN; inf is allowed.
    raise ValueError(f'magnitude_std must be >= 0, got {magnitude_std}.')
  names = list(RAND_AUGMENT_OPS)
  for index in rng.integers(0, len(names), size=num_ops):
    if rng.uniform() > prob:
      continue
    if math.isinf(magnitude_std):
      m = rng.uniform(0, magnitude)
    elif magnitude_std > 0:
      m = magnitude + magnitude_std * rng.normal()
    else:
      m = magnitude
    m = min(max(m, 0.0), 10.0) / 10 * (1 if rng.uniform() < 0.5 else -1)
    image = RAND_AUGMENT_OPS[names[index]](image, m)
  return image


def random_erasing(image: np.ndarray, rng: np.random.Generator,
                   prob: float = 0.25,
                   area: Tuple[float, float] = (0.02, 1 / 3),
                   aspect: Tuple[float, float] = (0.3, 1 / 0.3)
                   ) -> np.ndarray:
  """Zhong et al.'s random erasing, timm's 'pixel' mode (normal noise).

  Args:
    image: normalised float `(H, W, C)`.
    rng: random generator of this example.
    prob: probability of erasing one rectangle.
    area: range of its share of the image area.
    aspect: range of its aspect ratio (log-uniform).

  Returns:
    The image, a rectangle strictly smaller than it replaced by standard
    normal noise, or unchanged (also when ten tries find no such rectangle,
    as on a 1-pixel side).
  """
  prob = _checks.check_number('prob', prob, minimum=0.0, maximum=1.0)
  area = _check_range('area', area, 0.0)
  aspect = _check_range('aspect', aspect, 0.0)
  if rng.uniform() >= prob:
    return image
  height, width, channels = image.shape
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  for _ in range(10):
    target = height * width * rng.uniform(*area)
    ratio = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target * ratio)))
    w = int(round(math.sqrt(target / ratio)))
    if 0 < h < height and 0 < w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      image = image.copy()
      image[top:top + h, left:left + w] = rng.normal(
          size=(h, w, channels)).astype(image.dtype)
      return image
  return image


def train_transform(image: np.ndarray, rng: np.random.Generator,
                    config: Any) -> np.ndarray:
  """The DeiT training augmentation of one uint8 image -> float32 HWC.

  Args:
    image: uint8 `(H, W)` or `(H, W, C)`, C in 1..4 (see `to_pil`).
    rng: random generator of this example.
    config: the `input` config (image_size, random_resized_crop, crop_scale,
      flip, randaugment_*, random_erasing).

  Returns:
    `(image_size, image_size, 3)` float32, normalised.
  """
  pil = to_pil(image)
  if config.random_resized_crop:
    pil = random_resized_crop(pil, config.image_size, rng,
                              scale=tuple(config.crop_scale))
  else:
    pil = pil.resize((config.image_size,) * 2, Image.Resampling.BICUBIC)
  if config.flip and rng.uniform() < 0.5:
    pil = ImageOps.mirror(pil)
  if config.randaugment_ops:
    pil = rand_augment(pil, rng, config.randaugment_ops,
                       config.randaugment_magnitude,
                       config.randaugment_magnitude_std)
  out = normalize(pil)
  if config.random_erasing:
    out = random_erasing(out, rng, config.random_erasing)
  return out


def eval_transform(image: np.ndarray, config: Any) -> np.ndarray:
  """Resize and centre crop of one uint8 image -> float32 HWC (`to_pil`)."""
  return normalize(center_crop(to_pil(image), config.image_size,
                               config.crop_fraction))
