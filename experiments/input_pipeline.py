"""Input pipeline: tfds or an image folder, DeiT augmentations, host shards.

Examples are read by random access (`tfds.data_source`, no TensorFlow; or a
folder `root/CLASS/*.jpg`) and preprocessed (`experiments.transforms`) in
threads by grain. The order is
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
import importlib.util
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from experiments import transforms
from irpe_jax import _checks

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


def import_tfds():
  """`tensorflow_datasets`, after checking what it imports but does not declare.

  tensorflow-datasets imports `importlib_resources` whenever it prepares a
  dataset (`DatasetBuilder.code_path`) but lists it as a dependency only on
  Python < 3.9; without it the first `tfds.data_source` of an unprepared
  dataset fails deep inside tfds.

  Raises:
    ImportError: naming the missing package and how to install it.
  """
  for module, package in (('importlib_resources', 'importlib_resources'),
                          ('array_record', 'array_record')):
    if importlib.util.find_spec(module) is None:
      raise ImportError(
          f'The tfds data path needs the {package!r} package, which '
          f'tensorflow-datasets imports without installing it: pip install '
          f'{package} (or pip install "irpe_jax[experiments]").')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def get_source(dataset: str, split: str,
               data_dir: Optional[str] = None) -> Tuple[Any, int]:
  """A random-access source of `{'image', 'label'}` and its class count.

  Args:
    dataset: a tfds name (e.g. 'imagenet2012', 'cifar10'), optionally with a
      config ('name/config'); or 'folder:PATH' for `PATH/CLASS/IMAGE`, whose
      split folders are `PATH/SPLIT`.
    split: tfds split string ('train', 'validation', 'train[:90%]', ...).
    data_dir: tfds data directory (the config's `data_dir`; None: tfds'
      default, `~/tensorflow_datasets`). A dataset prepared there, e.g. by
      `experiments.make_tfds_dataset`, is read without its builder code;
      one that is not is prepared there first (ImageNet needs the manual
      download in `data_dir/downloads/manual`).

  Returns:
    `(source, num_classes)`.

  Raises:
    ValueError: if the dataset has no `image` feature or no `label` class
      feature.
  """
  if dataset.startswith('folder:'):
    source = ImageFolderSource(os.path.join(dataset[len('folder:'):], split))
    return source, len(source.classes)
  tfds = import_tfds()
  # tfds.data_source writes and reads array_record, the random-access format.
  source = tfds.data_source(dataset, split=split, data_dir=data_dir)
  features = source.dataset_info.features
  label = features['label'] if 'label' in features else None
  if 'image' not in features or not isinstance(label,
                                               tfds.features.ClassLabel):
    raise ValueError(f'dataset={dataset!r} must have an "image" feature and a '
                     f'"label" ClassLabel feature; it has {features}.')
  return source, label.num_classes


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
  # numpy seeds must be >= 0; checked here, not in a grain thread.
  seed = _checks.check_int('seed', seed, 0)
  num_examples = len(source)
  if not num_examples:
    raise ValueError('The training source has no examples.')
  offset, local = host_slice(config.batch_size)

  def read(k):
    step, j = divmod(k, local)
    position = step * config.batch_size + offset + j  # in the global stream.
    epoch, i = divmod(position, num_examples)
    example = source[int(_epoch_permutation(num_examples, seed, epoch)[i])]
    rng = np.random.default_rng([seed, 1, position])
    return {'image': transforms.train_transform(example['image'], rng,
                                                 config),
            'label': np.int32(example['label'])}

  ds = grain.MapDataset.range(start_step * local, num_steps * local)
  ds = ds.map(read).batch(local, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=config.prefetch)))


def eval_batches(source: Any, config: Any) -> Iterator[Dict[str, np.ndarray]]:
  """This host's eval batches, padded with `mask = 0` examples.

  Every host yields the same number of batches of `eval_batch_size /
  process_count` examples; host `p` holds the examples `p, p + P, ...`.
  """
  global_batch = config.eval_batch_size
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
    return {'image': transforms.eval_transform(example['image'], config),
            'label': np.int32(example['label']), 'mask': np.float32(1)}

  ds = grain.MapDataset.source(indices).map(read).batch(local)
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=config.prefetch)))


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

