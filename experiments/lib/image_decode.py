"""Image files to uint8 RGB arrays: every mode kept in range, bad files named.

Pure numpy and Pillow (no JAX), so that every reader of image files (the
DeiT folder source, DETR's COCO folder) decodes the same way:

- `read_image(path)` decodes a file completely, so a truncated one fails
  here, where its path is known, and raises `UnreadableImageError` naming
  the path and the reason (empty, not an image, truncated or corrupt,
  decompression bomb). Pillow's decompression-bomb limit
  (`Image.MAX_IMAGE_PIXELS`) is kept as it is.
- `to_rgb8(image)` turns a PIL image of any mode into `(h, w, 3)` uint8
  with its range kept (`convert('RGB')` clips 16-bit and float images).
- `normalize(image)` is the float input both models take (ImageNet mean
  and std).
"""

import io
import re
import threading
from typing import Optional, Tuple

from absl import logging
import numpy as np
import PIL
from PIL import Image


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image) -> np.ndarray:
  """uint8 RGB -> float32 normalised with the ImageNet mean and std."""
  return (np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


class UnreadableImageError(ValueError):
  """A file that cannot be decoded as an image, with its path and reason."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason

  def __reduce__(self):
    # Picklable with both fields (for multiprocessing readers).
    return type(self), (self.path, self.reason)


def _int_to_uint8(values: np.ndarray) -> np.ndarray:
  """Integer pixels of unknown depth -> uint8, the 16-bit way when they fit."""
  values = values.astype(np.int64)
  low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
  if low >= 0 and high <= 65535:
    # The 16-bit range (PNG 'I;16', or 16-bit data in 'I'): keep the high
    # byte, as Pillow itself reduces 16-bit RGB(A) PNGs, so a 16-bit grey
    # and a 16-bit colour file of one scene give the same pixels; 8-bit
    # values widened by `v * 257` come back exactly.
    return (values >> 8).astype(np.uint8)
  # 32-bit values outside 0..65535 declare no range: stretch the image's
  # own [min, max] to 0..255 so its content stays visible.
  scaled = (values - low) * 255.0 / max(high - low, 1)
  return np.round(scaled).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
  """'F' pixels -> uint8: x 255 when max <= 1 ([0, 1]), else clipped."""
  values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0,
                         neginf=0.0)
  if values.size and values.max() <= 1.0:
    values = values * 255.0  # a [0, 1] image (negatives clip to 0 below).
  return np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)


def to_rgb8(image: Image.Image) -> np.ndarray:
  """Any PIL image -> `(h, w, 3)` uint8 RGB, its range kept.

  - 'RGB': as is. 'L', '1', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV': Pillow's
    `convert('RGB')` (exact for these 8-bit modes).
  - 'LA', 'La', 'PA', 'RGBA', 'RGBa': the alpha channel is dropped, as
    Pillow's `convert('RGB')` and torchvision's `ImageFolder` loader (which
    the DeiT release trained with) do; transparent pixels keep their
    colour, nothing is composited onto a background.
  - 'I;16', 'I;16B', 'I;16L', 'I;16N' (16-bit) and 'I' (32-bit ints) with
    values in 0..65535: the high byte (`v >> 8`), so 0..65535 maps onto
    0..255. 'I' values outside that range: the image's [min, max] stretched
    to 0..255.
  - 'F' (float): assumed to be [0, 1] and scaled by 255 when its max is
    <= 1, otherwise clipped to 0..255; rounded, NaN as 0.
  Grey results are repeated to three channels.

  Args:
    image: a PIL image (decoded, or decodable on access).

  Returns:
    A `(h, w, 3)` uint8 array.

  Raises:
    ValueError: for a mode that Pillow cannot convert to RGB, naming it.
  """
  mode = image.mode
  if mode == 'RGB':
    return np.asarray(image)
  if mode == 'I' or mode.startswith('I;16'):
    grey = _int_to_uint8(np.asarray(image))
  elif mode == 'F':
    grey = _float_to_uint8(np.asarray(image))
  else:
    try:
      rgb = image.convert('RGB')
    except ValueError as e:
      raise ValueError(f'image mode {mode!r} cannot be converted to RGB '
                       f'({e}); expected a mode Pillow converts.') from e
    return np.asarray(rgb)
  return np.repeat(grey[..., None], 3, axis=-1)


# Paths already warned about as large but under Pillow's error limit.
_WARNED_LARGE = set()
_WARNED_LOCK = threading.Lock()


def _claimed_size(data: bytes) -> Optional[Tuple[int, int]]:
  """`(width, height)` from a header, without Pillow's bomb check; or None."""
  # `Image.open` refuses before it returns the image, so its size is read
  # by the format's own opener (Pillow's registry), best effort.
  Image.init()
  for format_id in Image.ID:
    factory, accept = Image.OPEN[format_id]
    try:
      if accept and not accept(data[:16]):
        continue
      return factory(io.BytesIO(data), '').size
    except Exception:  # pylint: disable=broad-except
      continue
  return None


def _bomb_reason(data: bytes, error: Exception) -> str:
  limit = 2 * Image.MAX_IMAGE_PIXELS
  size = _claimed_size(data)
  if size is not None:
    claimed = f'{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels'
  else:  # Pillow's message: "Image size (N pixels) exceeds limit of ...".
    found = re.search(r'\((\d+) pixels\)', str(error))
    claimed = f'{int(found[1]):,} pixels' if found else str(error)
  return (f'decompression bomb: its header claims {claimed}, more than '
          f'Pillow decodes ({limit:,} = 2 x Image.MAX_IMAGE_PIXELS)')


def read_image(path: str) -> np.ndarray:
  """Reads and fully decodes the image file `path` to `(h, w, 3)` uint8.

  The whole file is decoded here (not lazily, on first pixel access), so
  a truncated file fails with its path.

  Args:
    path: an image file (any format Pillow reads).

  Returns:
    `to_rgb8` of the image (its first frame).

  Raises:
    UnreadableImageError: the file is missing, unreadable by permission,
      empty, not an image, truncated or corrupt, or a decompression bomb
      (over twice `Image.MAX_IMAGE_PIXELS`); with the path and the reason.
    OSError: another I/O error reading the bytes (a disk or network
      failure, which may pass: not a property of the file, so not skipped).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
    raise UnreadableImageError(path, f'cannot be opened ({e.strerror})'
                               ) from None
  if not data:
    raise UnreadableImageError(path, 'empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      warn_above = Image.MAX_IMAGE_PIXELS  # None: the user turned it off.
      if warn_above and width * height > warn_above:
        with _WARNED_LOCK:
          first = path not in _WARNED_LARGE
          _WARNED_LARGE.add(path)
        if first:
          logging.warning('%s is %dx%d = %s pixels, over Image.MAX_IMAGE_'
                          'PIXELS = %s: decoded, but Pillow refuses twice '
                          'that.', path, width, height, f'{width * height:,}',
                          f'{Image.MAX_IMAGE_PIXELS:,}')
      image.load()
      try:
        return to_rgb8(image)
      except ValueError as e:
        raise UnreadableImageError(path, str(e)) from None
  except UnreadableImageError:
    raise
  except Image.DecompressionBombError as e:
    reason = _bomb_reason(data, e)
  except PIL.UnidentifiedImageError:
    reason = (f'not an image Pillow can read ({len(data):,} bytes, starting '
              f'{data[:8]!r})')
  except MemoryError:
    raise  # a condition of the machine, not of the file.
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError,
    # struct.error or zlib.error for broken data: all are the file's.
    text = (str(e) or type(e).__name__).replace('\n', ' ')
    kind = 'truncated' if 'truncat' in text.lower() else 'corrupt'
    reason = f'{kind} ({len(data):,} bytes): {type(e).__name__}: {text}'
  raise UnreadableImageError(path, reason)
