"""Images as the DETR release evaluates them, and padded batches of them.

The release's val transform (`datasets/coco.py`): `RandomResize([800],
max_size=1333)` (bilinear, the shorter side to 800 unless the longer would
pass 1333), `ToTensor`, ImageNet mean and std; a batch pads each image at
the bottom and right to the largest height and width (`NestedTensor`).
"""

from typing import Sequence, Tuple

import numpy as np
from PIL import Image

from experiments.lib import image_decode

# COCO's 91 category ids as DETR labels them ('N/A': ids COCO leaves out).
COCO_CLASSES = (
    'N/A', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus',
    'train', 'truck', 'boat', 'traffic light', 'fire hydrant', 'N/A',
    'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'N/A', 'backpack',
    'umbrella', 'N/A', 'N/A', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis',
    'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
    'skateboard', 'surfboard', 'tennis racket', 'bottle', 'N/A', 'wine glass',
    'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake',
    'chair', 'couch', 'potted plant', 'bed', 'N/A', 'dining table', 'N/A',
    'N/A', 'toilet', 'N/A', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator',
    'N/A', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush')
assert len(COCO_CLASSES) == 91


def resized_size(height: int, width: int, size: int = 800,
                 max_size: int = 1333) -> Tuple[int, int]:
  """`(height, width)` after the release's `get_size_with_aspect_ratio`.

  The shorter side becomes `size`, the longer keeps the aspect ratio
  (truncated to an int), unless it would pass `max_size`: then `size` is
  first lowered to `round(max_size * shorter / longer)`.
  """
  short, long = float(min(height, width)), float(max(height, width))
  if long / short * size > max_size:
    size = int(round(max_size * short / long))
  if (width <= height and width == size) or (height <= width and
                                             height == size):
    return height, width
  if width < height:
    return int(size * height / width), size
  return size, int(size * width / height)


def load_image(path: str, size: int = 800, max_size: int = 1333
               ) -> Tuple[np.ndarray, Tuple[int, int]]:
  """An RGB image file, resized and normalised as the release evaluates.

  Returns:
    `(image (h, w, 3) float32, (height, width) of the original)`.
  """
  # Decoded whole, every mode to 8-bit RGB with its range kept; a file
  # that does not decode is an error naming it.
  image = Image.fromarray(image_decode.read_image(path))
  height, width = image.height, image.width
  new_height, new_width = resized_size(height, width, size, max_size)
  image = image.resize((new_width, new_height), Image.BILINEAR)
  return image_decode.normalize(image), (height, width)


def pad_batch(images: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  """Pads `(h_i, w_i, 3)` images at the bottom and right into one batch.

  Returns:
    `images (B, H, W, 3)` (zeros on padding) and `pixel_mask (B, H, W)`,
    True on padding, with `H, W` the largest height and width.
  """
  height = max(i.shape[0] for i in images)
  width = max(i.shape[1] for i in images)
  batch = np.zeros((len(images), height, width, 3), np.float32)
  mask = np.ones((len(images), height, width), bool)
  for b, image in enumerate(images):
    batch[b, :image.shape[0], :image.shape[1]] = image
    mask[b, :image.shape[0], :image.shape[1]] = False
  return batch, mask

