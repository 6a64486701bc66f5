r"""An offline detection set in COCO format: digits pasted on canvases.

  python -m experiments.detr.make_synthetic_coco /tmp/digits_coco \
      [--num_train 512] [--num_val 64] [--seed 0] [--tfds_dir /tmp/tfds]

writes `OUT/{train,val}/*.png` and `OUT/annotations/instances_{train,val}
.json`, as COCO 2017 lays itself out, so the DETR training, evaluation and
pycocotools run on it unchanged. With `--tfds_dir` it also writes the same
canvases as the tfds dataset `synthetic_coco` (splits `train` and
`validation`, array_record) with the features of tfds' `coco/2017`, which
`tfds.data_source` then reads from that folder with no download. Each canvas
(64 to 128 pixels a side, a dark noisy background) holds 1 to 4 of
scikit-learn's 8x8 handwritten digits (UCI, shipped with the package: no
download), each scaled to 16-48 pixels, tinted, and placed without overlap; its
class is the digit (category id `digit + 1`, named '0'..'9'; id 0 is unused, as
COCO leaves ids out) and its box the tight box of its ink.
"""

import functools
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags
import numpy as np
from PIL import Image
from sklearn import datasets

from experiments.lib import cli

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


TFDS_NAME = 'synthetic_coco'
# tfds split -> the folder split it is written from.
TFDS_SPLITS = {'train': 'train', 'validation': 'val'}


@functools.cache
def _tfds_builder_class() -> type:
  # Made on first use: the folder set (the tests, the demo) needs no tfds.
  from experiments.lib import tfds_import  # pylint: disable=g-import-not-at-top
  tfds = tfds_import.import_tfds()

  class SyntheticCoco(tfds.core.GeneratorBasedBuilder,
                      skip_registration=True):
    """The digits canvases of a `make` folder, laid out as tfds' coco/2017."""

    name = TFDS_NAME
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def __init__(self, *, root: Optional[str] = None, **kwargs):
      self._root = root
      super().__init__(**kwargs)

    def _info(self) -> Any:
      return tfds.core.DatasetInfo(
          builder=self,
          description=__doc__.split('\n')[0],
          features=tfds.features.FeaturesDict({
              # PNG, as the folder holds them: the pixels stay exact.
              'image': tfds.features.Image(encoding_format='png'),
              'image/filename': tfds.features.Text(),
              'image/id': np.int64,
              'objects': tfds.features.Sequence({
                  'id': np.int64,
                  'area': np.int64,
                  'bbox': tfds.features.BBoxFeature(),
                  'label': tfds.features.ClassLabel(
                      names=[c['name'] for c in CATEGORIES]),
                  'is_crowd': np.bool_,
              }),
          }),
          # The category id of each label, which coco/2017 leaves out.
          metadata=tfds.core.MetadataDict(
              category_ids=[c['id'] for c in CATEGORIES]),
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {split: self._generate_examples(folder)
              for split, folder in TFDS_SPLITS.items()}

    def _generate_examples(self, folder: str):
      # As tfds' coco builder: one example per image, keyed by file name,
      # boxes normalised `(ymin, xmin, ymax, xmax)`, labels 0-based.
      with open(os.path.join(self._root, 'annotations',
                             f'instances_{folder}.json')) as f:
        coco = json.load(f)
      objects: Dict[int, List[Dict]] = {im['id']: [] for im in coco['images']}
      for a in coco['annotations']:
        objects[a['image_id']].append(a)
      for info in sorted(coco['images'], key=lambda im: im['id']):
        height, width = info['height'], info['width']
        with open(os.path.join(self._root, folder, info['file_name']),
                  'rb') as f:
          encoded = f.read()
        yield info['file_name'], {
            'image': encoded,
            'image/filename': info['file_name'],
            'image/id': info['id'],
            'objects': [{
                'id': a['id'], 'area': a['area'],
                'bbox': tfds.features.BBox(
                    ymin=a['bbox'][1] / height, xmin=a['bbox'][0] / width,
                    ymax=(a['bbox'][1] + a['bbox'][3]) / height,
                    xmax=(a['bbox'][0] + a['bbox'][2]) / width),
                'label': a['category_id'] - 1,
                'is_crowd': bool(a.get('iscrowd', 0)),
            } for a in sorted(objects[info['id']], key=lambda a: a['id'])],
        }

  return SyntheticCoco


def make_tfds(root: str, data_dir: str) -> Any:
  """Writes the set at `root` (made by `make`) as tfds' `synthetic_coco`.

  Args:
    root: a folder written by `make`.
    data_dir: tfds data directory to write to; `tfds.data_source(
      'synthetic_coco', data_dir=data_dir)` reads it.

  Returns:
    The prepared builder.

  Raises:
    ValueError: if `data_dir` already holds `synthetic_coco` of other sizes.
  """
  builder = _tfds_builder_class()(root=root, data_dir=data_dir,
                                  file_format='array_record')
  builder.download_and_prepare()
  found = {name: split.num_examples
           for name, split in builder.info.splits.items()}
  expected = {}
  for split, folder in TFDS_SPLITS.items():
    with open(os.path.join(root, 'annotations',
                           f'instances_{folder}.json')) as f:
      expected[split] = len(json.load(f)['images'])
  if found != expected:
    raise ValueError(
        f'{builder.data_dir} already holds {TFDS_NAME} with splits {found}, '
        f'not {expected}: use another tfds_dir or delete that folder.')
  return builder


COMMAND = cli.Command(
    'python -m experiments.detr.make_synthetic_coco', __doc__,
    positional=(('out', 1),))
flags.DEFINE_integer('num_train', 512, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('num_val', 64, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('seed', 0, '', flag_values=COMMAND.flags)
flags.DEFINE_string(
    'tfds_dir', None, f'also write the set as tfds {TFDS_NAME!r} here',
    flag_values=COMMAND.flags)


def main(argv: Sequence[str] = None) -> None:
  args = COMMAND.namespace(argv)
  for split, path in make(args.out, args.num_train, args.num_val,
                          args.seed).items():
    print(f'{split}: {path}')
  if args.tfds_dir:
    builder = make_tfds(args.out, args.tfds_dir)
    print(f'{TFDS_NAME}: {builder.data_dir} (--config.data.source=tfds '
          f'--config.data.tfds_name={TFDS_NAME} '
          f'--config.data.tfds_dir={args.tfds_dir})')


if __name__ == '__main__':
  main()
