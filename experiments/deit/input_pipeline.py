"""Input pipeline: tfds or an image folder, DeiT augmentations, host shards.

Examples are read by random access (`tfds.data_source`, no TensorFlow; or a
folder `root/CLASS/*.jpg`) and preprocessed (`experiments.deit.transforms`) in
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

A file of an image folder that cannot be decoded (`UnreadableImageError`:
empty, not an image, truncated, a decompression bomb, ...) does not end the
run. Training uses the next readable example of the epoch's permutation in
its place, which depends on the files only, so a resumed run reads the same
data; evaluation leaves it out (`mask = 0`). Each such file is logged once
with its path and reason, and more than `input.max_bad_images` (a share of
the split's files) stop the run with one `BadDataError` line.
"""

import functools
import os
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence,
                    Set, Tuple)

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np

from experiments.deit import transforms
from experiments.lib import image_decode
from experiments.lib import tfds_import
from irpe_jax import _checks

# Re-exported: the folder readers' decoding lives in `image_decode`, which
# needs no JAX (DETR's COCO reader uses it too).
UnreadableImageError = image_decode.UnreadableImageError
read_image = image_decode.read_image
to_rgb8 = image_decode.to_rgb8

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


# `input.max_bad_images` when a config has none (e.g. evaluate.py --model):
# the recipe's default (configs/common.py).
DEFAULT_MAX_BAD_IMAGES = 0.001


class BadDataError(ValueError):
  """More unreadable files in a split than `input.max_bad_images` allows."""


def folder_classes(root: str) -> List[str]:
  """The sorted names of the sub-folders of `root` (the class folders)."""
  return sorted(d for d in os.listdir(root)
                if os.path.isdir(os.path.join(root, d)))


class ImageFolderSource:
  """Random-access source of `root/CLASS_NAME/IMAGE` files.

  Labels are indices into `classes`: by default the sorted sub-folder names,
  as torchvision's `ImageFolder`; an eval split gets its training split's
  list, so that its labels are the model's even when its folders differ.

  A file that cannot be decoded raises `UnreadableImageError` (path and
  reason) and is remembered, so that later reads of it fail at once.
  """

  def __init__(self, root: str, classes: Optional[Sequence[str]] = None):
    """Lists the images of `root`.

    Args:
      root: a folder of class folders of images.
      classes: the class names whose indices are the labels (the training
        split's); None: the sorted class folders of `root`. A class folder
        of `root` not in it is an error, a class without a folder in `root`
        a warning.

    Raises:
      ValueError: `root` does not exist or holds no images, `classes` has
        duplicates, or `root` has a class folder that `classes` lacks.
    """
    if not os.path.isdir(root):
      raise ValueError(f'Image folder {root!r} does not exist.')
    self.root = root
    folders = folder_classes(root)
    if classes is None:
      self.classes = folders
    else:
      self.classes = [str(c) for c in classes]
      if len(set(self.classes)) != len(self.classes):
        raise ValueError(f'classes={self.classes} for {root!r} has '
                         'duplicates; expected distinct class names.')
      present = set(folders)
      unknown = sorted(present - set(self.classes))
      if unknown:
        raise ValueError(
            f'Image folder {root!r} has class folder(s) {unknown} that the '
            f'training split lacks (it has {len(self.classes)} classes): '
            'their labels would not match the model\'s. Remove them, or add '
            'them to the training split.')
      missing = [c for c in self.classes if c not in present]
      if missing:
        logging.warning(
            'Image folder %s has no folder for %d of the %d training '
            'classes: %s. Its labels are still the training split\'s.',
            root, len(missing), len(self.classes), missing)
    label_of = {name: i for i, name in enumerate(self.classes)}
    self.files: List[Tuple[str, int]] = []
    for name in folders:  # sorted, so labels ascend as with classes=None.
      folder = os.path.join(root, name)
      self.files += [(os.path.join(folder, f), label_of[name])
                     for f in sorted(os.listdir(folder))
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.files:
      raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in the '
                       f'class folders of {root!r}.')
    # Set by the reader threads; one dict store needs no lock (and a lock
    # would keep the source from pickling into grain worker processes).
    self._unreadable: Dict[int, Tuple[str, str]] = {}
    # Paths already logged as unreadable: once per source, not per epoch
    # or per evaluation (see `_BadFileTally`).
    self.reported_unreadable: Set[str] = set()

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    path, label = self.files[index]
    known = self._unreadable.get(index)
    if known is not None:
      raise UnreadableImageError(*known)
    try:
      image = read_image(path)
    except UnreadableImageError as e:
      self._unreadable[index] = (e.path, e.reason)
      raise
    return {'image': image, 'label': label}


def get_source(dataset: str, split: str, data_dir: Optional[str] = None,
               classes_from: Optional[str] = None,
               print_fn: Callable[[str], Any] = logging.info
               ) -> Tuple[Any, int]:
  """A random-access source of `{'image', 'label'}` and its class count.

  Args:
    dataset: a tfds name (e.g. 'imagenet2012', 'cifar10'), optionally with a
      config ('name/config'); or 'folder:PATH' for `PATH/CLASS/IMAGE`, whose
      split folders are `PATH/SPLIT`.
    split: tfds split string ('train', 'validation', 'train[:90%]', ...).
    data_dir: tfds data directory (the config's `data_dir`; None: tfds'
      default, `~/tensorflow_datasets`). A dataset prepared there, e.g. by
      `experiments.deit.make_tfds_dataset`, is read without its builder code;
      one that is not is prepared there first (ImageNet needs the manual
      download in `data_dir/downloads/manual`).
    classes_from: folder datasets: the split (the training one) whose
      sorted class folders give the labels of `split`, when `PATH/
      classes_from` exists (`ImageFolderSource(classes=...)`: a class
      folder it lacks is an error, one it has and `split` lacks a warning).
      None, the split itself, or a missing folder: `split`'s own folders.
      tfds splits share the dataset's `ClassLabel` already: ignored.
    print_fn: where the line saying which classes label a folder split goes
      (absl `logging.info`; `print` where logging is not set up).

  Returns:
    `(source, num_classes)`.

  Raises:
    ValueError: if the dataset has no `image` feature or no `label` class
      feature, or a folder split has a class that `classes_from` lacks.
  """
  if dataset.startswith('folder:'):
    root = dataset[len('folder:'):]
    path = os.path.join(root, split)
    classes = None
    if classes_from is not None and classes_from != split:
      reference = os.path.join(root, classes_from)
      if os.path.isdir(reference):
        classes = folder_classes(reference)
        print_fn(f'Labels of {path}: indices of the {len(classes)} class '
                 f'folders of {reference}.')
      else:
        print_fn(f'Labels of {path}: its own class folders ({reference} '
                 'does not exist).')
    source = ImageFolderSource(path, classes)
    return source, len(source.classes)
  tfds = tfds_import.import_tfds()
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
# Unreadable files: counted, logged once, checked against the limit.


def max_bad_share(config: Any) -> float:
  """`config.max_bad_images` (the `input` config), checked to be in [0, 1]."""
  return _checks.check_number(
      'input.max_bad_images',
      getattr(config, 'max_bad_images', DEFAULT_MAX_BAD_IMAGES),
      minimum=0.0, maximum=1.0)


def _describe(source: Any, default: str) -> str:
  root = getattr(source, 'root', None)
  return root if isinstance(root, str) else default


class _BadFileTally:
  """The distinct unreadable files one iterator met, in the order met.

  Fed in the main thread, batch by batch in order, so that what is logged
  and where the limit stops a run depend on the data and the position
  only, not on how the threads were scheduled.
  """

  def __init__(self, source: Any, what: str, num_files: int, limit: float):
    self.what, self.num_files, self.limit = what, num_files, limit
    self.files: Dict[str, str] = {}  # path -> reason.
    reported = getattr(source, 'reported_unreadable', None)
    self._reported = reported if isinstance(reported, set) else set()

  def add(self, errors: Sequence[UnreadableImageError]) -> None:
    """Counts `errors`, logs the new ones, stops above the limit.

    Raises:
      BadDataError: once the share of distinct unreadable files is above
        the limit.
    """
    for error in errors:
      if error.path in self.files:
        continue
      self.files[error.path] = error.reason
      if error.path not in self._reported:
        self._reported.add(error.path)
        logging.warning(
            'Skipping unreadable image %s: %s. %d of the %d files of %s '
            'unreadable so far (input.max_bad_images=%g).', error.path,
            error.reason, len(self.files), self.num_files, self.what,
            self.limit)
    share = len(self.files) / max(self.num_files, 1)
    if share > self.limit:
      raise BadDataError(
          f'{len(self.files)} of the {self.num_files} files of {self.what} '
          f'({share:.2%}) are unreadable, more than input.max_bad_images='
          f'{self.limit:g} ({self.limit:.2%}) allows: fix or remove them '
          '(each is logged above with its reason), or raise '
          'input.max_bad_images.')


class _CheckedBatches:
  """A grain batch iterator whose skipped files are tallied in batch order.

  Attributes:
    bad_files: `{path: reason}` of the unreadable files met so far.
  """

  def __init__(self, batches: Iterator[Dict[str, np.ndarray]],
               tally: _BadFileTally,
               skipped_in: Callable[[int], List[UnreadableImageError]],
               summary: bool = False):
    self._batches, self._tally, self._skipped_in = batches, tally, skipped_in
    self._summary = summary
    self._index = 0

  @property
  def bad_files(self) -> Dict[str, str]:
    return dict(self._tally.files)

  def __iter__(self) -> '_CheckedBatches':
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    try:
      batch = next(self._batches)
    except BadDataError as e:
      # Raised in a grain thread, it comes back as itself but with grain's
      # note on its traceback appended; a fresh one is the one clean line.
      raise BadDataError(str(e)) from None
    except StopIteration:
      if self._summary and self._tally.files:
        logging.warning('%d unreadable image(s) of %s left out (mask 0).',
                        len(self._tally.files), self._tally.what)
      raise
    self._tally.add(self._skipped_in(self._index))
    self._index += 1
    return batch


def _first_readable(source: Any, order: np.ndarray, i: int,
                    what: str) -> Tuple[Dict[str, Any],
                                        List[UnreadableImageError]]:
  """`source[order[i]]`, else the next readable one of `order`, cyclically.

  Returns:
    The example and the errors of the unreadable files passed over.

  Raises:
    BadDataError: not one file of `order` is readable.
  """
  skipped = []
  for n in range(len(order)):
    try:
      return source[int(order[(i + n) % len(order)])], skipped
    except UnreadableImageError as e:
      skipped.append(e)
  raise BadDataError(f'Not one of the {len(order)} files of {what} is '
                     f'readable; the first: {skipped[0]}.')


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

  An unreadable file (`UnreadableImageError`) is replaced by the next
  readable example of its epoch's permutation, augmented as the position it
  fills: a function of the files, so a resumed run reads the same batches.
  Each one is logged once (path, reason, count so far); the iterator's
  `bad_files` holds them.

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

  Raises:
    BadDataError: from the iterator, at the first batch after which the
      distinct unreadable files this host met are more than
      `config.max_bad_images` of the split's files (each host counts what
      it reads itself).
  """
  # numpy seeds must be >= 0; checked here, not in a grain thread.
  seed = _checks.check_int('seed', seed, 0)
  limit = max_bad_share(config)
  num_examples = len(source)
  if not num_examples:
    raise ValueError('The training source has no examples.')
  offset, local = host_slice(config.batch_size)
  what = _describe(source, 'the training split')
  # Element k -> the unreadable files its read passed over; written by the
  # grain threads, taken by the main thread once k's batch is out.
  skipped: Dict[int, List[UnreadableImageError]] = {}

  def read(k):
    step, j = divmod(k, local)
    position = step * config.batch_size + offset + j  # in the global stream.
    epoch, i = divmod(position, num_examples)
    example, passed_over = _first_readable(
        source, _epoch_permutation(num_examples, seed, epoch), i, what)
    if passed_over:
      skipped[k] = passed_over
    rng = np.random.default_rng([seed, 1, position])
    return {'image': transforms.train_transform(example['image'], rng,
                                                 config),
            'label': np.int32(example['label'])}

  def skipped_in(batch: int) -> List[UnreadableImageError]:
    first = (start_step + batch) * local
    return [e for k in range(first, first + local)
            for e in skipped.pop(k, ())]

  ds = grain.MapDataset.range(start_step * local, num_steps * local)
  ds = ds.map(read).batch(local, drop_remainder=True)
  batches = iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=config.prefetch)))
  return _CheckedBatches(batches, _BadFileTally(source, what, num_examples,
                                                limit), skipped_in)


def eval_batches(source: Any, config: Any) -> Iterator[Dict[str, np.ndarray]]:
  """This host's eval batches, padded with `mask = 0` examples.

  Every host yields the same number of batches of `eval_batch_size /
  process_count` examples; host `p` holds the examples `p, p + P, ...`.
  An unreadable file (`UnreadableImageError`) gets `mask = 0` too, so the
  metrics are over the readable images; each is logged once per source
  with its path and reason, and the iterator's `bad_files` holds them.

  Raises:
    BadDataError: from the iterator, once more than `config.max_bad_images`
      of this host's eval files are unreadable.
  """
  limit = max_bad_share(config)
  global_batch = config.eval_batch_size
  _, local = host_slice(global_batch)
  count, index = jax.process_count(), jax.process_index()
  mine = np.arange(index, len(source), count)
  per_host = -(-len(source) // count)
  total = -(-per_host // local) * local
  indices = np.full(total, -1)
  indices[:len(mine)] = mine
  # Example index -> its error; written by the grain threads, taken by the
  # main thread once the example's batch is out.
  unreadable: Dict[int, UnreadableImageError] = {}

  def padding():
    return {'image': np.zeros((config.image_size, config.image_size, 3),
                              np.float32),
            'label': np.int32(0), 'mask': np.float32(0)}

  def read(i):
    if i < 0:
      return padding()
    try:
      example = source[int(i)]
    except UnreadableImageError as e:
      unreadable[int(i)] = e
      return padding()
    return {'image': transforms.eval_transform(example['image'], config),
            'label': np.int32(example['label']), 'mask': np.float32(1)}

  def skipped_in(batch: int) -> List[UnreadableImageError]:
    return [unreadable.pop(int(i))
            for i in indices[batch * local:(batch + 1) * local]
            if int(i) in unreadable]

  ds = grain.MapDataset.source(indices).map(read).batch(local)
  batches = iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=config.prefetch)))
  tally = _BadFileTally(source, _describe(source, 'the eval split'),
                        len(mine), limit)
  return _CheckedBatches(batches, tally, skipped_in, summary=True)


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

