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
import itertools
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

from experiments import transforms
from experiments.detr import preprocess
from experiments.detr import sources

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


def augment(example: Example, rng: np.random.Generator,
            scales: Sequence[int], max_size: int, flip: bool,
            random_crop: Optional[RandomCrop] = None) -> Example:
  """DETR's train transform: flip, then resize or (resize, crop, resize).

  Boxes are relative, so a resize leaves them unchanged and a flip maps
  `cx` to `1 - cx`. Without `random_crop` no random number is drawn for it.

  Returns:
    The example with a normalised float32 image.
  """
  image, boxes = example['image'], example['boxes']
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
    boxes = boxes * [-1, 1, 1, 1] + [1, 0, 0, 0]
  example = dict(example, image=image, boxes=boxes.astype(np.float32))
  if random_crop is not None and rng.random() < random_crop.prob:
    side = int(rng.choice(random_crop.resize_scales))
    example['image'] = _resized(example['image'], side, None)
    example = random_size_crop(example, rng, random_crop.min_size,
                               random_crop.max_size)
  size = int(rng.choice(scales)) if scales else None
  return dict(example, image=resize(example['image'], size, max_size))


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
  return transforms.normalize(_resized(image, size, max_size))


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
            max_objects: int) -> Dict[str, np.ndarray]:
  """Pads normalised examples into one batch of a fixed set of shapes.

  Returns:
    `images (B, H, W, 3)`, `pixel_mask (B, H, W)` (True = padding),
    `labels (B, T)`, `boxes (B, T, 4)`, `valid (B, T)`, `image_id (B,)`,
    `orig_size (B, 2)`, with `T = max_objects`.

  Raises:
    ValueError: if an image has more than `max_objects` objects.
  """
  height = padded_side(max(e['image'].shape[0] for e in examples), pad_sides)
  width = padded_side(max(e['image'].shape[1] for e in examples), pad_sides)
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


def train_batches(examples: Sequence[Example], batch_size: int,
                  start_step: int, seed: int, scales: Sequence[int],
                  max_size: int, flip: bool, pad_sides: Sequence[int],
                  max_objects: int, random_crop: Optional[RandomCrop] = None,
                  num_threads: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless shuffled, augmented batches from step `start_step + 1` on.

  Batch `s` (1-based) is a function of `(seed, s)` only, so a resumed run
  sees the very batches the interrupted one would have, whatever
  `num_threads` (batches made ahead in threads, see `prefetched`).
  `examples` is read by index: a source reads them on demand.
  """
  if not len(examples):
    raise ValueError('The training examples are empty.')
  per_epoch = max(len(examples) // batch_size, 1)

  def make(step):
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    chosen = order[index * batch_size:(index + 1) * batch_size]
    rng = np.random.default_rng([seed, epoch, index, 1])
    return collate([augment(examples[i], rng, scales, max_size, flip,
                            random_crop) for i in chosen],
                   pad_sides, max_objects)

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
