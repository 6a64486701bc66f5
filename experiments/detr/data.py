"""Detection data in COCO format: examples, augmentation, padded batches.

Reads any folder laid out as COCO 2017 (`images/*.jpg|png` and an
`instances_*.json`): COCO itself or the offline digits set of
`make_synthetic_coco`. Boxes become DETR's targets, `(cx, cy, w, h)`
relative to the image, labels its category ids. Training takes DETR's
augmentations (horizontal flip, multi-scale resize of the shorter side with
a cap on the longer); evaluation the single eval size.

Batches pad every image at the bottom and right (True in `pixel_mask` on
the padding) to the smallest `(H, W)` of `pad_sides x pad_sides` that holds
them, and the targets to `max_objects`: a run compiles at most
`len(pad_sides) ** 2` training steps, whatever the image sizes.
"""

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from experiments import transforms
from experiments.detr import preprocess

Example = Dict[str, np.ndarray]


def load_annotations(ann_file: str) -> Tuple[List[Dict], Dict[int, List]]:
  """COCO images and, per image id, its non-crowd annotations."""
  with open(ann_file) as f:
    coco = json.load(f)
  objects: Dict[int, List] = {im['id']: [] for im in coco['images']}
  for a in coco['annotations']:
    if not a.get('iscrowd', 0):
      objects[a['image_id']].append(a)
  return coco['images'], objects


def load_example(image_dir: str, info: Dict, annotations: List[Dict]
                 ) -> Example:
  """One image (uint8 `(h, w, 3)`) with DETR's targets for it."""
  with Image.open(os.path.join(image_dir, info['file_name'])) as image:
    pixels = np.asarray(image.convert('RGB'))
  height, width = pixels.shape[:2]
  boxes = np.array([a['bbox'] for a in annotations],
                   np.float32).reshape(-1, 4)
  # The release's `ConvertCocoPolysToMask`: xywh -> clipped xyxy, drop empty.
  xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
  xyxy = np.clip(xyxy, 0, [width, height, width, height])
  keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
  xyxy = xyxy[keep]
  scale = np.array([width, height, width, height], np.float32)
  cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2,
                           xyxy[:, 2:] - xyxy[:, :2]], 1) / scale
  labels = np.array([a['category_id'] for a in annotations],
                    np.int32)[keep]
  return {'image': pixels, 'boxes': cxcywh.astype(np.float32),
          'labels': labels, 'image_id': np.int64(info['id']),
          'orig_size': np.array([height, width], np.int32)}


def load_split(image_dir: str, ann_file: str) -> List[Example]:
  """Every image of a split, in memory (for small sets such as the digits)."""
  images, objects = load_annotations(ann_file)
  return [load_example(image_dir, info, objects[info['id']])
          for info in images]


def augment(example: Example, rng: np.random.Generator,
            scales: Sequence[int], max_size: int, flip: bool) -> Example:
  """DETR's train transform: random flip, resize to a random scale.

  Boxes are relative, so a resize leaves them unchanged and a flip maps
  `cx` to `1 - cx`.
  """
  image, boxes = example['image'], example['boxes']
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
    boxes = boxes * [-1, 1, 1, 1] + [1, 0, 0, 0]
  size = int(rng.choice(scales)) if scales else None
  return dict(example, image=resize(image, size, max_size),
              boxes=boxes.astype(np.float32))


def resize(image: np.ndarray, size: Optional[int], max_size: int
           ) -> np.ndarray:
  """Normalised float32 image, its shorter side resized to `size` (None: kept)."""
  pil = Image.fromarray(image)
  if size is not None:
    height, width = preprocess.resized_size(image.shape[0], image.shape[1],
                                            size, max_size)
    if (height, width) != image.shape[:2]:
      pil = pil.resize((width, height), Image.BILINEAR)
  return transforms.normalize(pil)


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
    out['boxes'][b, :n] = e['boxes']
    out['valid'][b, :n] = True
    out['image_id'][b] = e['image_id']
    out['orig_size'][b] = e['orig_size']
  return out


def train_batches(examples: Sequence[Example], batch_size: int,
                  start_step: int, seed: int, scales: Sequence[int],
                  max_size: int, flip: bool, pad_sides: Sequence[int],
                  max_objects: int) -> Iterator[Dict[str, np.ndarray]]:
  """Endless shuffled, augmented batches from step `start_step + 1` on.

  Batch `s` (1-based) is a function of `(seed, s)` only, so a resumed run
  sees the very batches the interrupted one would have.
  """
  per_epoch = max(len(examples) // batch_size, 1)
  step = start_step
  while True:
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    chosen = order[index * batch_size:(index + 1) * batch_size]
    rng = np.random.default_rng([seed, epoch, index, 1])
    yield collate([augment(examples[i], rng, scales, max_size, flip)
                   for i in chosen], pad_sides, max_objects)
    step += 1


def eval_batches(examples: Sequence[Example], batch_size: int,
                 size: Optional[int], max_size: int,
                 pad_sides: Sequence[int], max_objects: int
                 ) -> Iterator[Dict[str, np.ndarray]]:
  """Every example once, at the eval size; the last batch is smaller."""
  for start in range(0, len(examples), batch_size):
    chunk = [dict(e, image=resize(e['image'], size, max_size))
             for e in examples[start:start + batch_size]]
    yield collate(chunk, pad_sides, max_objects)
