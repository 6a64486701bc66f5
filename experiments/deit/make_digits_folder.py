r"""Writes scikit-learn's handwritten digits as an image folder, offline.

  python -m experiments.deit.make_digits_folder /tmp/digits
  python -m experiments.deit.train \
      --config experiments/deit/configs/digits_folder.py \
      --config.dataset=folder:/tmp/digits --workdir /tmp/digits_run

The 1797 8x8 digits ship inside scikit-learn, so nothing is downloaded.
Each is upscaled (nearest neighbour, so strokes stay sharp) to a grey RGB
PNG and written as `OUT/SPLIT/CLASS/INDEX.png`, the layout of
`--config.dataset=folder:OUT`: a stratified, fixed 75/25 split into
`train/` (1347 images) and `test/` (450 images), classes `0` to `9`.
"""

import os
import sys
from typing import Dict, Optional, Sequence

from absl import flags
import numpy as np
from PIL import Image

from experiments.lib import cli


def write_digits(out: str, size: int = 32, test_fraction: float = 0.25,
                 seed: int = 0) -> Dict[str, int]:
  """Writes the digits as `out/{train,test}/{0..9}/NNNN.png`.

  Args:
    out: the folder to write (created; existing files are overwritten).
    size: side of the square RGB images, a multiple of 8.
    test_fraction: share of each class held out as `test/`.
    seed: seed of the split.

  Returns:
    `{'train': count, 'test': count}`.

  Raises:
    ValueError: `size` is not a positive multiple of 8.
  """
  if not isinstance(size, int) or size <= 0 or size % 8:
    raise ValueError(f'size={size!r}; expected a positive multiple of 8.')
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # 0..16 ink -> white on black, 8 bits.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  indices = np.arange(len(images))
  train, test = model_selection.train_test_split(
      indices, test_size=test_fraction, stratify=digits.target,
      random_state=seed)
  scale = size // 8
  counts = {}
  for split, chosen in (('train', train), ('test', test)):
    for i in sorted(chosen):
      folder = os.path.join(out, split, str(digits.target[i]))
      os.makedirs(folder, exist_ok=True)
      big = np.kron(images[i], np.ones((scale, scale), np.uint8))
      Image.fromarray(np.repeat(big[..., None], 3, -1)).save(
          os.path.join(folder, f'{i:04d}.png'))
    counts[split] = len(chosen)
  return counts


COMMAND = cli.Command(
    'python -m experiments.deit.make_digits_folder', __doc__,
    positional=(('out', 1),))
flags.DEFINE_integer(
    'size', 32, 'image side in pixels, a multiple of 8',
    flag_values=COMMAND.flags)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = COMMAND.namespace(argv)
  try:
    counts = write_digits(args.out, args.size)
  except ValueError as e:
    cli.usage_error(str(e))
  print(f'Wrote {counts["train"]} train and {counts["test"]} test digits of '
        f'{args.size}x{args.size} to {os.path.abspath(args.out)}/'
        '{train,test}/{0..9}/.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
