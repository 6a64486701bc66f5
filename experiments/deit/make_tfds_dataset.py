r"""Prepares a CIFAR-10-shaped tfds dataset offline, for runs without downloads.

    python -m experiments.deit.make_tfds_dataset --data_dir /tmp/tfds \
        --num_train 2000 --num_test 500
    python -m experiments.deit.train \
        --config experiments/deit/configs/cifar10_tiny.py \
        --workdir /tmp/c10 --config.dataset=synthetic_cifar10 \
        --config.data_dir=/tmp/tfds

`synthetic_cifar10` has the features and splits of tfds' `cifar10` (`id`,
`image` 32x32x3 uint8, `label` of 10 classes; `train` and `test`) and is
written in the array_record format that `tfds.data_source` reads. Once
prepared, tfds finds it in `data_dir` by name without importing this module.

Each class is a sinusoidal grating of its own orientation and colour, with a
random phase, frequency, contrast, background and noise per image: learnable,
but not from one pixel.
"""

import io
import math
import sys
from typing import Optional, Sequence

from absl import flags
import numpy as np
from PIL import Image

from experiments.lib import cli
from experiments.lib import tfds_import

tfds = tfds_import.import_tfds()

NAME = 'synthetic_cifar10'
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# tfds' cifar10 label names, in its order.
CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
               'horse', 'ship', 'truck')


def make_image(label: int, rng: np.random.Generator) -> np.ndarray:
  """A `(32, 32, 3)` uint8 image of class `label`."""
  height, width, _ = IMAGE_SHAPE
  angle = math.pi * label / NUM_CLASSES
  frequency = rng.uniform(0.25, 0.5)
  rows, cols = np.mgrid[:height, :width].astype(np.float32)
  wave = np.sin(frequency * (cols * math.cos(angle) + rows * math.sin(angle))
                + rng.uniform(0, 2 * math.pi))
  hue = 2 * math.pi * label / NUM_CLASSES
  colour = 0.5 + 0.5 * np.cos(hue + np.array([0, 2, 4]) * math.pi / 3)
  background = rng.uniform(0.2, 0.8, size=3)
  contrast = rng.uniform(0.2, 0.45)
  image = (background + contrast * wave[..., None] * (2 * colour - 1)
           + rng.normal(0, 0.05, IMAGE_SHAPE))
  return np.clip(np.round(255 * image), 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  # Encoded here with Pillow: tfds encodes arrays with TensorFlow, which the
  # data path does not need.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


class SyntheticCifar10(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10-shaped images of 10 grating classes (see the module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, num_train: int = 2000, num_test: int = 500,
               seed: int = 0, **kwargs):
    for name, value in (('num_train', num_train), ('num_test', num_test)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}.')
    self._sizes = {'train': num_train, 'test': num_test}
    self._seed = seed
    super().__init__(**kwargs)

  def _info(self) -> 'tfds.core.DatasetInfo':
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(shape=IMAGE_SHAPE),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in self._sizes}

  def _generate_examples(self, split: str):
    # One generator per split and seed; labels cycle so classes are balanced.
    rng = np.random.default_rng([self._seed, 0 if split == 'train' else 1])
    for i in range(self._sizes[split]):
      key = f'{split}_{i:06d}'
      label = i % NUM_CLASSES
      yield key, {'id': key, 'image': _png(make_image(label, rng)),
                  'label': label}


def prepare(data_dir: str, num_train: int = 2000, num_test: int = 500,
            seed: int = 0) -> SyntheticCifar10:
  """Writes `synthetic_cifar10` to `data_dir` (array_record) unless it is there.

  Args:
    data_dir: tfds data directory (the config's `data_dir`).
    num_train: examples in the `train` split.
    num_test: examples in the `test` split.
    seed: seed of the images.

  Returns:
    The prepared builder.

  Raises:
    ValueError: if `data_dir` already holds the dataset with other sizes.
  """
  builder = SyntheticCifar10(num_train=num_train, num_test=num_test,
                             seed=seed, data_dir=data_dir,
                             file_format='array_record')
  builder.download_and_prepare()
  found = {name: split.num_examples
           for name, split in builder.info.splits.items()}
  if found != {'train': num_train, 'test': num_test}:
    raise ValueError(
        f'{builder.data_dir} already holds {NAME} with splits {found}, not '
        f'train={num_train}, test={num_test}: use another data_dir or '
        f'delete that folder.')
  return builder


COMMAND = cli.Command('python -m experiments.deit.make_tfds_dataset', __doc__)
flags.DEFINE_string(
    'data_dir', None, 'tfds data directory', flag_values=COMMAND.flags,
    required=True)
flags.DEFINE_integer('num_train', 2000, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('num_test', 500, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('seed', 0, '', flag_values=COMMAND.flags)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = COMMAND.namespace(argv)
  try:
    builder = prepare(args.data_dir, args.num_train, args.num_test, args.seed)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{NAME} in {builder.data_dir}: use --config.dataset={NAME} '
        f'--config.data_dir={args.data_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
