"""DETR's augmentations and padded batches of detection examples.

Examples come from a source (`experiments.detr.sources`: a COCO-format
folder or a tfds dataset, read on demand), boxes as DETR's targets `(cx, cy,
w, h)` relative to the image, labels its category ids. Training takes the
release's train transform (`datasets/coco.py`, `make_coco_transforms`):
random horizontal flip, then either a multi-scale resize of the shorter side
with a cap on the longer, or (`RandomCrop`, half the time) a resize to
400-600, a random crop of 384-600 pixels a side and the multi-scale resize.
Evaluation takes the single eval size.

Batches pad every image at the bottom and right (True in `pixel_mask` on
the padding) to the smallest `(H, W)` of `pad_sides x pad_sides` that holds
them, and the targets to `max_objects`: a run compiles at most
`len(pad_sides) ** 2` training steps, whatever the image sizes. An image
may have no objects (a crop can remove them all): its targets are all
padding.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

from experiments.detr import preprocess
from experiments.detr import sources
from experiments.lib import image_decode

Example = sources.Example


def load_split(image_dir: str, ann_file: str) -> List[Example]:
  """Every image of a COCO-format split, in memory (small sets: the digits).

  Large sets are read on demand: `sources.CocoFolderSource(image_dir,
  ann_file)` is the same sequence without holding it.
  """
  return list(sources.CocoFolderSource(image_dir, ann_file))


@dataclasses.dataclass(frozen=True)
class RandomCrop:
  """The crop branch of DETR's train transform.

  With probability `prob` an image is resized (shorter side to one of
  `resize_scales`, no cap), cropped by `RandomSizeCrop(min_size, max_size)`,
  then given the multi-scale resize as the other branch (the release's
  `RandomSelect`, 0.5). The release's sizes are in `configs/coco.py`.
  """
  resize_scales: Tuple[int, ...]
  min_size: int
  max_size: int
  prob: float = 0.5

  def __post_init__(self):
    if not 0 < self.min_size <= self.max_size:
      raise ValueError(f'RandomCrop sizes ({self.min_size}, {self.max_size}):'
                       ' expected 0 < min_size <= max_size.')
    if not self.resize_scales or min(self.resize_scales) <= 0:
      raise ValueError(f'RandomCrop resize_scales={self.resize_scales}: '
                       'expected positive sides.')
    if not 0 <= self.prob <= 1:
      raise ValueError(f'RandomCrop prob={self.prob}: expected in [0, 1].')


def crop_of(input_config: Any) -> Optional[RandomCrop]:
  """The `RandomCrop` of `config.input` (`crop`, `crop_scales`, `crop_size`).

  None when `crop` is False or absent.
  """
  if not input_config.get('crop', False):
    return None
  min_size, max_size = input_config.crop_size
  return RandomCrop(tuple(input_config.crop_scales), min_size, max_size)


def crop(example: Example, top: int, left: int, height: int, width: int
         ) -> Example:
  """The `(height, width)` window at `(top, left)`, as the release's `crop`.

  Boxes are shifted, clipped to the window, and dropped with their labels
  where nothing of them is left.
  """
  image = example['image']
  rows, cols = image.shape[:2]
  boxes = example['boxes'].astype(np.float64)
  xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2,
                         boxes[:, :2] + boxes[:, 2:] / 2], 1)
  xyxy = xyxy * [cols, rows, cols, rows] - [left, top, left, top]
  xyxy = np.clip(xyxy, 0, [width, height, width, height])
  keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
  xyxy = xyxy[keep] / [width, height, width, height]
  cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2,
                           xyxy[:, 2:] - xyxy[:, :2]], 1)
  return dict(example, image=image[top:top + height, left:left + width],
              boxes=cxcywh.astype(np.float32).reshape(-1, 4),
              labels=example['labels'][keep])


def random_size_crop(example: Example, rng: np.random.Generator,
                     min_size: int, max_size: int) -> Example:
  """The release's `RandomSizeCrop`: a uniform window of a random size.

  Its width is uniform in `[min_size, min(width, max_size)]` (inclusive;
  `min_size` lowered to the width of a narrower image), its height
  likewise, its position uniform over the image.
  """
  rows, cols = example['image'].shape[:2]
  width = int(rng.integers(min(min_size, cols), min(cols, max_size) + 1))
  height = int(rng.integers(min(min_size, rows), min(rows, max_size) + 1))
  top = int(rng.integers(0, rows - height + 1))
  left = int(rng.integers(0, cols - width + 1))
  return crop(example, top, left, height, width)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What the train transform does to one image, drawn from its size alone.

  Attributes:
    flip: mirror left-right first.
    crop: `(height, width, top, left, crop_height, crop_width)`: resize to
      `(height, width)`, then keep that window; None for no crop.
    out: the `(height, width)` the image ends at (the final resize).
  """
  flip: bool
  crop: Optional[Tuple[int, int, int, int, int, int]]
  out: Tuple[int, int]


def plan(height: int, width: int, rng: np.random.Generator,
         scales: Sequence[int], max_size: Optional[int], flip: bool,
         random_crop: Optional[RandomCrop] = None) -> Geometry:
  """DETR's train transform of a `height x width` image, without its pixels.

  Draws from `rng` what `augment` draws, in the same order (flip; crop or
  not, its resize side and window as `random_size_crop`; the scale), so
  that the sizes of a batch are known before any image is decoded: every
  host pads its part of a global batch to the same shape, and the epoch
  replay of `experiments.benchmarks.bench_detr` is this function.
  """
  flipped = bool(flip and rng.random() < 0.5)
  window = None
  if random_crop is not None and rng.random() < random_crop.prob:
    side = int(rng.choice(random_crop.resize_scales))
    rows, cols = preprocess.resized_size(height, width, side, math.inf)
    low, high = random_crop.min_size, random_crop.max_size
    crop_width = int(rng.integers(min(low, cols), min(cols, high) + 1))
    crop_height = int(rng.integers(min(low, rows), min(rows, high) + 1))
    top = int(rng.integers(0, rows - crop_height + 1))
    left = int(rng.integers(0, cols - crop_width + 1))
    window = (rows, cols, top, left, crop_height, crop_width)
    height, width = crop_height, crop_width
  if scales:
    size = int(rng.choice(scales))
    height, width = preprocess.resized_size(
        height, width, size, math.inf if max_size is None else max_size)
  return Geometry(flipped, window, (height, width))


def apply(example: Example, geometry: Geometry) -> Example:
  """`geometry` applied to `example`; its image normalised float32.

  Boxes are relative, so a resize leaves them unchanged and a flip maps
  `cx` to `1 - cx`.
  """
  image, boxes = example['image'], example['boxes']
  if geometry.flip:
    image = image[:, ::-1]
    boxes = boxes * [-1, 1, 1, 1] + [1, 0, 0, 0]
  example = dict(example, image=image, boxes=boxes.astype(np.float32))
  if geometry.crop is not None:
    rows, cols, top, left, crop_height, crop_width = geometry.crop
    example['image'] = _resized_to(example['image'], rows, cols)
    example = crop(example, top, left, crop_height, crop_width)
  return dict(example, image=image_decode.normalize(
      _resized_to(example['image'], *geometry.out)))


def augment(example: Example, rng: np.random.Generator,
            scales: Sequence[int], max_size: int, flip: bool,
            random_crop: Optional[RandomCrop] = None) -> Example:
  """DETR's train transform: flip, then resize or (resize, crop, resize).

  `plan` from the image's own size, then `apply`. Without `random_crop`
  no random number is drawn for it.

  Returns:
    The example with a normalised float32 image.
  """
  height, width = example['image'].shape[:2]
  return apply(example, plan(height, width, rng, scales, max_size, flip,
                             random_crop))


def _resized_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if (height, width) == image.shape[:2]:
    return np.asarray(image)
  pil = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize((width, height), Image.BILINEAR))


def _resized(image: np.ndarray, size: Optional[int],
             max_size: Optional[int]) -> Image.Image:
  pil = Image.fromarray(np.ascontiguousarray(image))
  if size is not None:
    height, width = preprocess.resized_size(
        image.shape[0], image.shape[1], size,
        math.inf if max_size is None else max_size)
    if (height, width) != image.shape[:2]:
      pil = pil.resize((width, height), Image.BILINEAR)
  return np.asarray(pil)


def resize(image: np.ndarray, size: Optional[int], max_size: Optional[int]
           ) -> np.ndarray:
  """Normalised float32 image, its shorter side resized to `size` (None: kept).

  The longer side is capped at `max_size` (None: no cap).
  """
  return image_decode.normalize(_resized(image, size, max_size))


def padded_side(length: int, pad_sides: Sequence[int]) -> int:
  """The smallest of `pad_sides` that holds `length`.

  Raises:
    ValueError: if none does.
  """
  for side in sorted(pad_sides):
    if side >= length:
      return side
  raise ValueError(f'an image side of {length} pixels is larger than every '
                   f'pad_sides={tuple(pad_sides)}; add a larger one.')


def collate(examples: Sequence[Example], pad_sides: Sequence[int],
            max_objects: int, shape: Optional[Tuple[int, int]] = None
            ) -> Dict[str, np.ndarray]:
  """Pads normalised examples into one batch of a fixed set of shapes.

  The batch's `(H, W)` is the smallest of `pad_sides x pad_sides` that
  holds its images, or `shape` (the global batch's, which every host pads
  its part to).

  Returns:
    `images (B, H, W, 3)`, `pixel_mask (B, H, W)` (True = padding),
    `labels (B, T)`, `boxes (B, T, 4)`, `valid (B, T)`, `image_id (B,)`,
    `orig_size (B, 2)`, with `T = max_objects`.

  Raises:
    ValueError: if an image has more than `max_objects` objects.
  """
  height = padded_side(max(e['image'].shape[0] for e in examples), pad_sides)
  width = padded_side(max(e['image'].shape[1] for e in examples), pad_sides)
  if shape is not None:
    if height > shape[0] or width > shape[1]:
      raise ValueError(f'an image padded to {(height, width)} does not fit '
                       f'the batch shape {tuple(shape)}.')
    height, width = shape
  batch = len(examples)
  out = {'images': np.zeros((batch, height, width, 3), np.float32),
         'pixel_mask': np.ones((batch, height, width), bool),
         'labels': np.zeros((batch, max_objects), np.int32),
         'boxes': np.zeros((batch, max_objects, 4), np.float32),
         'valid': np.zeros((batch, max_objects), bool),
         'image_id': np.zeros((batch,), np.int64),
         'orig_size': np.zeros((batch, 2), np.int32)}
  for b, e in enumerate(examples):
    h, w = e['image'].shape[:2]
    n = len(e['labels'])
    if n > max_objects:
      raise ValueError(f'image {int(e["image_id"])} has {n} objects, more '
                       f'than max_objects={max_objects}.')
    out['images'][b, :h, :w] = e['image']
    out['pixel_mask'][b, :h, :w] = False
    out['labels'][b, :n] = e['labels']
    out['boxes'][b, :n] = np.reshape(e['boxes'], (-1, 4))
    out['valid'][b, :n] = True
    out['image_id'][b] = e['image_id']
    out['orig_size'][b] = e['orig_size']
  return out


def prefetched(make: Callable[[Any], Any], keys: Iterable[Any],
               num_threads: int) -> Iterator[Any]:
  """`map(make, keys)`, `num_threads` items made ahead in threads, in order.

  Decoding and resizing (Pillow) release the GIL, so threads overlap them
  with each other and with the device step. With 0 threads it is `map`.
  Closing the iterator waits only for the items already started.
  """
  if isinstance(num_threads, bool) or not isinstance(num_threads, int) or (
      num_threads < 0):
    raise ValueError(f'num_threads={num_threads!r}: expected an int >= 0.')
  if not num_threads:
    return map(make, keys)
  return _ahead(make, iter(keys), num_threads)


def _ahead(make: Callable[[Any], Any], keys: Iterator[Any],
           num_threads: int) -> Iterator[Any]:
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque(
        pool.submit(make, k) for k in itertools.islice(keys, num_threads))
    try:
      while pending:
        item = pending.popleft().result()
        for k in itertools.islice(keys, 1):
          pending.append(pool.submit(make, k))
        yield item
    finally:
      for future in pending:
        future.cancel()


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """What example `index` draws its transform from in epoch `epoch`.

  A function of the example, not of its place in a batch: the batches can
  be formed after the transforms are drawn, and no host's rows depend on
  another's.
  """
  return np.random.default_rng([seed, epoch, index, 1])


def epoch_plans(sizes: np.ndarray, seed: int, epoch: int,
                scales: Sequence[int], max_size: Optional[int], flip: bool,
                random_crop: Optional[RandomCrop] = None) -> List[Geometry]:
  """The `Geometry` of every example in epoch `epoch`, from `(N, 2)` sizes."""
  return [plan(int(h), int(w), example_rng(seed, epoch, i), scales, max_size,
               flip, random_crop) for i, (h, w) in enumerate(sizes)]


def portrait(plans: Sequence[Geometry]) -> np.ndarray:
  """1 where an image enters its batch taller than wide, else 0."""
  return np.array([p.out[0] > p.out[1] for p in plans], np.int32)


def epoch_order(num_examples: int, batch_size: int, seed: int, epoch: int,
                orientations: Optional[np.ndarray] = None) -> np.ndarray:
  """The examples of every batch of epoch `epoch`: `(batches, batch_size)`.

  The epoch's shuffle (a function of `(seed, epoch)`) cut into batches.
  With `orientations` (`portrait` of the images as they are batched: after
  their flip, crop and resize), landscape images are batched with
  landscape ones and portrait with portrait, as Detectron2's aspect-ratio
  grouping does, and the batches shuffled (`(seed, epoch, 2)`): one
  landscape and one portrait image no longer force a square padded batch.
  The two groups leave up to two part-batches out, so a grouped epoch has
  one batch less than `num_examples // batch_size`, whatever the epoch's
  draws (at least 2 batches are needed, else it is not grouped). A split
  smaller than a batch gives one short batch.
  """
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  if num_examples < batch_size:
    return order[None]
  per_epoch = num_examples // batch_size
  if orientations is None or per_epoch < 2:
    return order[:per_epoch * batch_size].reshape(per_epoch, batch_size)
  kinds = np.asarray(orientations)[order]
  batches = [group[i * batch_size:(i + 1) * batch_size]
             for group in (order[kinds == 0], order[kinds == 1])
             for i in range(len(group) // batch_size)]
  shuffle = np.random.default_rng([seed, epoch, 2]).permutation(len(batches))
  return np.stack(batches)[shuffle[:per_epoch - 1]]


def train_batches(examples: Sequence[Example], batch_size: int,
                  start_step: int, seed: int, scales: Sequence[int],
                  max_size: int, flip: bool, pad_sides: Sequence[int],
                  max_objects: int, random_crop: Optional[RandomCrop] = None,
                  num_threads: int = 0, sizes: Optional[np.ndarray] = None,
                  grouped: bool = True, num_shards: int = 1,
                  shard_index: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless shuffled, augmented batches from step `start_step + 1` on.

  Global batch `s` (1-based, `batch_size` images) is a function of `(seed,
  s)` only: a resumed run sees the very batches the interrupted one would
  have, whatever `num_threads` (batches made ahead in threads, see
  `prefetched`) or the number of hosts. This host makes its part, rows
  `shard_index * batch_size // num_shards` on, and reads only those
  examples (by index: a source reads them on demand). Each example's
  transform is drawn from `example_rng`.

  Args:
    sizes: `(N, 2)` heights and widths of the examples
      (`sources.image_sizes`), or None. With them the transforms are drawn
      from the sizes before any image is read (`epoch_plans`): every host
      pads its rows to the global batch's shape, and with `grouped` the
      batches hold one orientation each (`epoch_order`). Without them each
      transform is drawn once its image is decoded, the batches are not
      grouped, and several hosts pad to the largest of `pad_sides`.
    grouped: group by orientation (needs `sizes`).
    num_shards: hosts sharing each batch; `batch_size` divides by it.
    shard_index: this host's index.
  """
  if not len(examples):
    raise ValueError('The training examples are empty.')
  if batch_size % num_shards:
    raise ValueError(f'batch_size={batch_size} must divide by the '
                     f'{num_shards} hosts.')
  grouped = grouped and sizes is not None
  per_epoch = len(epoch_order(len(examples), batch_size, seed, 0,
                              np.zeros(len(examples)) if grouped else None))
  local = batch_size // num_shards
  largest = (max(pad_sides), max(pad_sides))

  @functools.lru_cache(maxsize=2)
  def epoch_of(epoch):
    plans = None if sizes is None else epoch_plans(
        sizes, seed, epoch, scales, max_size, flip, random_crop)
    return plans, epoch_order(len(examples), batch_size, seed, epoch,
                              portrait(plans) if grouped else None)

  def make(step):
    epoch, index = divmod(step, per_epoch)
    plans, orders = epoch_of(epoch)
    chosen = orders[index]
    mine = chosen[shard_index * local:(shard_index + 1) * local]
    if plans is None:
      return collate([augment(examples[i], example_rng(seed, epoch, i),
                              scales, max_size, flip, random_crop)
                      for i in mine], pad_sides, max_objects,
                     shape=largest if num_shards > 1 else None)
    shape = (padded_side(max(plans[i].out[0] for i in chosen), pad_sides),
             padded_side(max(plans[i].out[1] for i in chosen), pad_sides))
    return collate([apply(examples[i], plans[i]) for i in mine], pad_sides,
                   max_objects, shape=shape)

  return prefetched(make, itertools.count(start_step), num_threads)


def eval_batches(examples: Sequence[Example], batch_size: int,
                 size: Optional[int], max_size: int,
                 pad_sides: Sequence[int], max_objects: int,
                 num_threads: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Every example once, at the eval size; the last batch is smaller."""

  def make(start):
    return collate([
        dict(e, image=resize(e['image'], size, max_size))
        for e in (examples[i] for i in
                  range(start, min(start + batch_size, len(examples))))],
                   pad_sides, max_objects)

  return prefetched(make, range(0, len(examples), batch_size), num_threads)
