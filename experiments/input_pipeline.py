"""Input pipeline: tfds or an image folder, DeiT augmentations, host shards.

Examples are read by random access (`tfds.data_source`, no TensorFlow; or a
folder `root/CLASS/*.jpg`) and preprocessed in threads by grain. The order is
a pure function of `(seed, step)`:

- every epoch has one global permutation of the training set, the same on
  every host; the global batch of step `s` is the slice
  `[s * B, (s + 1) * B)` of the concatenated epochs;
- host `p` of `P` reads and augments only its contiguous `B / P` part of
  each global batch, with a random generator seeded by the example's
  global position.

So the global batch does not depend on the number of hosts or threads, and
resuming at step `s` (the checkpointed data position) continues exactly.
Mixup and cutmix mix whole batches and run on the device (`mixup_cutmix`).
"""

import functools
import math
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


class ImageFolderSource:
  """Random-access source of `root/CLASS_NAME/IMAGE` files.

  Classes are the sorted sub-folder names; labels their indices, as
  torchvision's `ImageFolder`.
  """

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise ValueError(f'Image folder {root!r} does not exist.')
    self.classes = sorted(d for d in os.listdir(root)
                          if os.path.isdir(os.path.join(root, d)))
    self.files: List[Tuple[str, int]] = []
    for label, name in enumerate(self.classes):
      folder = os.path.join(root, name)
      self.files += [(os.path.join(folder, f), label)
                     for f in sorted(os.listdir(folder))
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.files:
      raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in the '
                       f'class folders of {root!r}.')

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    path, label = self.files[index]
    with Image.open(path) as image:
      return {'image': np.asarray(image.convert('RGB')), 'label': label}


def get_source(dataset: str, split: str,
               data_dir: Optional[str] = None) -> Tuple[Any, int]:
  """A random-access source of `{'image', 'label'}` and its class count.

  Args:
    dataset: a tfds name (e.g. 'imagenet2012', 'cifar10'), optionally with a
      config ('name/config'); or 'folder:PATH' for `PATH/CLASS/IMAGE`, whose
      split folders are `PATH/SPLIT`.
    split: tfds split string ('train', 'validation', 'train[:90%]', ...).
    data_dir: tfds data directory (ImageNet must be prepared there from the
      manual download first).

  Returns:
    `(source, num_classes)`.
  """
  if dataset.startswith('folder:'):
    source = ImageFolderSource(os.path.join(dataset[len('folder:'):], split))
    return source, len(source.classes)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(dataset, data_dir=data_dir)
  source = tfds.data_source(dataset, split=split, data_dir=data_dir)
  return source, builder.info.features['label'].num_classes


# ----------------------------------------------------------------------------
# Per-example transforms on uint8 HWC numpy images.


def random_resized_crop(image: Image.Image, size: int,
                        rng: np.random.Generator,
                        scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> Image.Image:
  """Inception-style crop of random area and aspect, resized to `size`."""
  width, height = image.size
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return image.resize((size, size), Image.BICUBIC,
                          box=(left, top, left + w, top + h))
  return center_crop(image, size, crop_fraction=1.0)


def center_crop(image: Image.Image, size: int,
                crop_fraction: float = 0.875) -> Image.Image:
  """DeiT eval: resize the short side to `size / crop_fraction`, crop."""
  width, height = image.size
  short = int(size / crop_fraction)
  scale = short / min(width, height)
  new_w = max(size, round(width * scale))
  new_h = max(size, round(height * scale))
  image = image.resize((new_w, new_h), Image.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return image.crop((left, top, left + size, top + size))


def _fill() -> Tuple[int, int, int]:
  return tuple(int(255 * m) for m in IMAGENET_MEAN)


def _affine(image, matrix):
  return image.transform(image.size, Image.AFFINE, matrix,
                         resample=Image.BILINEAR, fillcolor=_fill())


# RandAugment ops as timm's 'rand-m9-mstd0.5-inc1' (DeiT): each takes a PIL
# image and a signed magnitude in [-1, 1] (magnitude / 10, random sign
# where the op has a direction).
_RAND_AUGMENT_OPS: Dict[str, Callable[[Image.Image, float], Image.Image]] = {
    'AutoContrast': lambda im, m: ImageOps.autocontrast(im),
    'Equalize': lambda im, m: ImageOps.equalize(im),
    'Invert': lambda im, m: ImageOps.invert(im),
    'Rotate': lambda im, m: im.rotate(30 * m, resample=Image.BILINEAR,
                                      fillcolor=_fill()),
    'PosterizeIncreasing': lambda im, m: ImageOps.posterize(
        im, 4 - int(abs(m) * 4)),
    'SolarizeIncreasing': lambda im, m: ImageOps.solarize(
        im, 256 - int(abs(m) * 256)),
    'SolarizeAdd': lambda im, m: Image.fromarray(np.where(
        np.asarray(im) < 128,
        np.minimum(np.asarray(im).astype(np.int32) + int(abs(m) * 110), 255),
        np.asarray(im)).astype(np.uint8)),
    'ColorIncreasing': lambda im, m: ImageEnhance.Color(im).enhance(1 + .9 * m),
    'ContrastIncreasing': lambda im, m: ImageEnhance.Contrast(im).enhance(
        1 + .9 * m),
    'BrightnessIncreasing': lambda im, m: ImageEnhance.Brightness(im).enhance(
        1 + .9 * m),
    'SharpnessIncreasing': lambda im, m: ImageEnhance.Sharpness(im).enhance(
        1 + .9 * m),
    'ShearX': lambda im, m: _affine(im, (1, .3 * m, 0, 0, 1, 0)),
    'ShearY': lambda im, m: _affine(im, (1, 0, 0, .3 * m, 1, 0)),
    'TranslateXRel': lambda im, m: _affine(
        im, (1, 0, .45 * m * im.size[0], 0, 1, 0)),
    'TranslateYRel': lambda im, m: _affine(
        im, (1, 0, 0, 0, 1, .45 * m * im.size[1])),
}


def rand_augment(image: Image.Image, rng: np.random.Generator,
                 num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5
                 ) -> Image.Image:
  """RandAugment (Cubuk et al.) as timm's `rand-m9-mstd0.5-inc1`.

  Args:
    image: RGB PIL image.
    rng: random generator of this example.
    num_ops: ops applied in sequence, each chosen uniformly.
    magnitude: out of 10.
    magnitude_std: std of a Gaussian jitter on the magnitude per op.
    prob: probability of applying each chosen op.

  Returns:
    The augmented image.
  """
  names = list(_RAND_AUGMENT_OPS)
  for index in rng.integers(0, len(names), size=num_ops):
    if rng.uniform() > prob:
      continue
    m = magnitude + magnitude_std * rng.normal() if magnitude_std else magnitude
    m = float(np.clip(m, 0, 10)) / 10 * (1 if rng.uniform() < 0.5 else -1)
    image = _RAND_AUGMENT_OPS[names[index]](image, m)
  return image


def random_erasing(image: np.ndarray, rng: np.random.Generator,
                   prob: float = 0.25,
                   area: Tuple[float, float] = (0.02, 1 / 3),
                   aspect: Tuple[float, float] = (0.3, 3.3)) -> np.ndarray:
  """Zhong et al.'s random erasing, timm's 'pixel' mode (normal noise).

  Args:
    image: normalised float `(H, W, C)`.
    rng: random generator of this example.
    prob: probability of erasing one rectangle.
    area: range of its share of the image area.
    aspect: range of its aspect ratio (log-uniform).

  Returns:
    The image, a rectangle replaced by standard normal noise or unchanged.
  """
  if rng.uniform() >= prob:
    return image
  height, width, channels = image.shape
  for _ in range(10):
    target = height * width * rng.uniform(*area)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
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


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> float32 normalised with the ImageNet mean and std."""
  return (np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def to_pil(image: np.ndarray) -> Image.Image:
  """uint8 `(H, W, C)` (C 1 or 3) or `(H, W)` -> RGB PIL image."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image).convert('RGB')


def train_transform(image: np.ndarray, rng: np.random.Generator,
                    config: Any) -> np.ndarray:
  """The DeiT training augmentation of one uint8 image -> float32 HWC."""
  pil = to_pil(image)
  if config.get('random_resized_crop', True):
    pil = random_resized_crop(pil, config.image_size, rng,
                              scale=tuple(config.get('crop_scale',
                                                     (0.08, 1.0))))
  else:
    pil = pil.resize((config.image_size,) * 2, Image.BICUBIC)
  if config.get('flip', True) and rng.uniform() < 0.5:
    pil = ImageOps.mirror(pil)
  if config.get('randaugment_ops', 0):
    pil = rand_augment(pil, rng, config.randaugment_ops,
                       config.get('randaugment_magnitude', 9.0),
                       config.get('randaugment_magnitude_std', 0.5))
  out = normalize(pil)
  if config.get('random_erasing', 0.0):
    out = random_erasing(out, rng, config.random_erasing)
  return out


def eval_transform(image: np.ndarray, config: Any) -> np.ndarray:
  """Resize and centre crop of one uint8 image -> float32 HWC."""
  return normalize(center_crop(to_pil(image), config.image_size,
                               config.get('crop_fraction', 0.875)))


# ----------------------------------------------------------------------------
# Batching and host sharding.


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def host_slice(global_batch: int) -> Tuple[int, int]:
  """`(offset, size)` of this host's contiguous part of a global batch."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch % count:
    raise ValueError(f'batch_size={global_batch} must divide by the number '
                     f'of hosts, {count}.')
  size = global_batch // count
  return index * size, size


def train_iterator(source: Any, config: Any, start_step: int, num_steps: int,
                   seed: int) -> Iterator[Dict[str, np.ndarray]]:
  """This host's part of the global training batches from `start_step` on.

  Args:
    source: random-access source of `{'image': uint8 HWC, 'label': int}`.
    config: the `input` config (batch_size, image_size, augmentations,
      num_threads, prefetch).
    start_step: first step to produce (the data position of a checkpoint).
    num_steps: last step (exclusive).
    seed: data seed.

  Returns:
    An iterator of `{'image': (b, S, S, 3) float32, 'label': (b,) int32}`
    with `b = batch_size / process_count`.
  """
  num_examples = len(source)
  offset, local = host_slice(config.batch_size)

  def read(k):
    step, j = divmod(k, local)
    position = step * config.batch_size + offset + j  # in the global stream.
    epoch, i = divmod(position, num_examples)
    example = source[int(_epoch_permutation(num_examples, seed, epoch)[i])]
    rng = np.random.default_rng([seed, 1, position])
    return {'image': train_transform(example['image'], rng, config),
            'label': np.int32(example['label'])}

  ds = grain.MapDataset.range(start_step * local, num_steps * local)
  ds = ds.map(read).batch(local, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.get('num_threads', 8),
      prefetch_buffer_size=config.get('prefetch', 4))))


def eval_batches(source: Any, config: Any) -> Iterator[Dict[str, np.ndarray]]:
  """This host's eval batches, padded with `mask = 0` examples.

  Every host yields the same number of batches of `eval_batch_size /
  process_count` examples; host `p` holds the examples `p, p + P, ...`.
  """
  global_batch = config.get('eval_batch_size', config.batch_size)
  _, local = host_slice(global_batch)
  count, index = jax.process_count(), jax.process_index()
  mine = np.arange(index, len(source), count)
  per_host = -(-len(source) // count)
  total = -(-per_host // local) * local
  indices = np.full(total, -1)
  indices[:len(mine)] = mine

  def read(i):
    if i < 0:
      return {'image': np.zeros((config.image_size, config.image_size, 3),
                                np.float32),
              'label': np.int32(0), 'mask': np.float32(0)}
    example = source[int(i)]
    return {'image': eval_transform(example['image'], config),
            'label': np.int32(example['label']), 'mask': np.float32(1)}

  ds = grain.MapDataset.source(indices).map(read).batch(local)
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.get('num_threads', 8),
      prefetch_buffer_size=config.get('prefetch', 4))))


# ----------------------------------------------------------------------------
# On device: mixup and cutmix of a whole (global) batch.


def mixup_cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5) -> Tuple[jax.Array, jax.Array]:
  """timm's batch-mode Mixup as DeiT uses it: mixup or cutmix per batch.

  The batch is mixed with itself reversed; one lambda per batch. With both
  alphas positive, cutmix is chosen with `switch_prob`.

  Args:
    rng: a PRNG key.
    images: `(B, H, W, C)`.
    targets: `(B, K)` (label-smoothed) target distributions.
    mixup_alpha: Beta parameter of mixup; 0 disables it.
    cutmix_alpha: Beta parameter of cutmix; 0 disables it.
    switch_prob: probability of cutmix when both are enabled.

  Returns:
    Mixed `(images, targets)`.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  rng_switch, rng_mix, rng_cut, rng_box = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(rng_mix, max(mixup_alpha, 1e-3),
                            max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(rng_cut, max(cutmix_alpha, 1e-3),
                            max(cutmix_alpha, 1e-3))
  _, height, width, _ = images.shape
  # Cutmix box of area ~ (1 - lam), clipped to the image; lambda corrected.
  cut = jnp.sqrt(1.0 - lam_cut)
  cy, cx = jax.random.uniform(rng_box, (2,)) * jnp.array([height, width])
  y0 = jnp.clip(jnp.round(cy - cut * height / 2), 0, height)
  y1 = jnp.clip(jnp.round(cy + cut * height / 2), 0, height)
  x0 = jnp.clip(jnp.round(cx - cut * width / 2), 0, width)
  x1 = jnp.clip(jnp.round(cx + cut * width / 2), 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_cut = 1.0 - box.mean()
  flipped = images[::-1]
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  images = jnp.where(use_cutmix, cutmixed, mixed.astype(images.dtype))
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return images, targets


def smooth_one_hot(labels: jax.Array, num_classes: int,
                   smoothing: float) -> jax.Array:
  """One-hot targets with timm's label smoothing (off value `s / K`)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off

