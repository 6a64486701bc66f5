r"""An offline detection set in COCO format: digits pasted on canvases.

  python -m experiments.detr.make_synthetic_coco /tmp/digits_coco \
      [--num_train 512] [--num_val 64] [--seed 0]

writes `OUT/{train,val}/*.png` and `OUT/annotations/instances_{train,val}
.json`, as COCO 2017 lays itself out, so the DETR training, evaluation and
pycocotools run on it unchanged. Each canvas (64 to 128 pixels a side, a
dark noisy background) holds 1 to 4 of scikit-learn's 8x8 handwritten digits
(UCI, shipped with the package: no download), each scaled to 16-48 pixels,
tinted, and placed without overlap; its class is the digit (category id
`digit + 1`, named '0'..'9'; id 0 is unused, as COCO leaves ids out) and
its box the tight box of its ink.
"""

import argparse
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image
from sklearn import datasets

CANVAS_SIDES = (64, 96, 128)
NUM_CLASSES = 11  # category ids 1..10 (digit + 1), as DETR counts ids.
CATEGORIES = [{'id': d + 1, 'name': str(d), 'supercategory': 'digit'}
              for d in range(10)]


def _place(rng, side, size, boxes, tries=20):
  for _ in range(tries):
    y, x = rng.integers(0, side - size + 1, 2)
    new = (x, y, x + size, y + size)
    if all(new[2] <= b[0] or b[2] <= new[0] or new[3] <= b[1] or b[3] <= new[1]
           for b in boxes):
      return new
  return None


def make_image(rng: np.random.Generator, digits: np.ndarray,
               labels: np.ndarray, side: int, max_objects: int = 4
               ) -> Tuple[np.ndarray, List[Dict]]:
  """One canvas and its COCO annotations (without ids).

  Returns:
    `(image (side, side, 3) uint8, [{'bbox': [x, y, w, h], 'category_id',
    'area', 'iscrowd'}])`.
  """
  image = rng.normal(30, 12, (side, side, 3)).clip(0, 255)
  placed, annotations = [], []
  for _ in range(rng.integers(1, max_objects + 1)):
    size = int(rng.integers(16, min(48, side // 2) + 1))
    spot = _place(rng, side, size, placed)
    if spot is None:
      continue
    placed.append(spot)
    k = rng.integers(len(digits))
    glyph = Image.fromarray((digits[k] * (255 / 16)).astype(np.uint8))
    ink = np.asarray(glyph.resize((size, size), Image.BILINEAR),
                     np.float32) / 255
    color = rng.uniform(120, 255, 3)
    x0, y0 = spot[:2]
    region = image[y0:y0 + size, x0:x0 + size]
    image[y0:y0 + size, x0:x0 + size] = (region * (1 - ink[..., None])
                                         + color * ink[..., None])
    rows, cols = np.nonzero(ink > 0.25)
    bx, by = x0 + cols.min(), y0 + rows.min()
    bw, bh = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
    annotations.append({'bbox': [int(bx), int(by), int(bw), int(bh)],
                        'category_id': int(labels[k]) + 1,
                        'area': int(bw * bh), 'iscrowd': 0})
  if not annotations:  # the first object always fits; never reached.
    raise AssertionError('a canvas without objects')
  return image.astype(np.uint8), annotations


def write_split(out: str, split: str, count: int, seed: int,
                digits: np.ndarray, labels: np.ndarray,
                sides: Sequence[int] = CANVAS_SIDES) -> str:
  """Writes `count` canvases of `split`; returns the annotation file."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(out, split), exist_ok=True)
  images, annotations = [], []
  for i in range(count):
    side = int(rng.choice(sides))
    image, objects = make_image(rng, digits, labels, side)
    name = f'{i:06d}.png'
    Image.fromarray(image).save(os.path.join(out, split, name))
    images.append({'id': i + 1, 'file_name': name, 'height': side,
                   'width': side})
    for obj in objects:
      annotations.append(dict(obj, id=len(annotations) + 1, image_id=i + 1))
  os.makedirs(os.path.join(out, 'annotations'), exist_ok=True)
  path = os.path.join(out, 'annotations', f'instances_{split}.json')
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': annotations,
               'categories': CATEGORIES}, f)
  return path


def make(out: str, num_train: int = 512, num_val: int = 64, seed: int = 0,
         sides: Sequence[int] = CANVAS_SIDES) -> Dict[str, str]:
  """Writes both splits (train and val digits disjoint); annotation files.

  The train canvases use the first 1500 of scikit-learn's 1797 digits, the
  val canvases the rest, so evaluation sees unseen handwriting.
  """
  digits = datasets.load_digits()
  images, labels = digits.images, digits.target
  return {
      'train': write_split(out, 'train', num_train, seed, images[:1500],
                           labels[:1500], sides),
      'val': write_split(out, 'val', num_val, seed + 1, images[1500:],
                         labels[1500:], sides),
  }


def main(argv: Sequence[str] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('out', help='folder to write the set to')
  parser.add_argument('--num_train', type=int, default=512)
  parser.add_argument('--num_val', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  for split, path in make(args.out, args.num_train, args.num_val,
                          args.seed).items():
    print(f'{split}: {path}')


if __name__ == '__main__':
  main()
