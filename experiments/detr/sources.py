"""Detection examples read on demand: a COCO-format folder or a tfds dataset.

A source is a `Sequence` of examples: `len(source)` images, `source[i]`
reads and decodes image `i` only then, so COCO's 118k training images never
sit in memory. Both kinds give the same example for the same image:

  `image (h, w, 3) uint8`, `boxes (n, 4) float32` DETR's `(cx, cy, w, h)`
  relative to the image, `labels (n,) int32` COCO category ids (1..90),
  `image_id` (COCO's), `orig_size (2,) int32` `(h, w)`;

crowd objects are left out, boxes clipped to the image and empty ones
dropped, as the release's `ConvertCocoPolysToMask`.

- `CocoFolderSource`: COCO 2017 as downloaded (`val2017/*.jpg` and
  `annotations/instances_val2017.json`), or `make_synthetic_coco`'s folder.
- `TfdsCocoSource`: a tfds dataset with `coco/2017`'s features (prepared by
  the user, `tfds build coco/2017`, or `make_synthetic_coco --tfds_dir`),
  read by random access with `tfds.data_source` (array_record, no
  TensorFlow). tfds keeps 0-based labels of the 80 classes: they map to
  COCO's category ids (`COCO_CATEGORY_IDS`). pycocotools needs an
  annotation json: `annotation_file` writes the split's once.
"""

import abc
import collections.abc
import io
import json
import operator
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

Example = Dict[str, np.ndarray]

# COCO 2017's 80 category ids in order: tfds' coco label `k` is the k-th
# (tfds sorts the categories by id). The other 11 of 1..90 are unused, which
# is why DETR has 91 classes (id 0 is unused too).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
    43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)

SOURCES = ('folder', 'tfds')


def example_of(pixels: np.ndarray, xyxy: np.ndarray, labels: np.ndarray,
               image_id: int) -> Example:
  """An example from pixel boxes `(x0, y0, x1, y1)`: clipped, empties dropped.

  Args:
    pixels: `(h, w, 3)` uint8 (grey `(h, w)` or `(h, w, 1)` is made RGB).
    xyxy: `(n, 4)` boxes in pixels.
    labels: `(n,)` category ids.
    image_id: the COCO image id.
  """
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  height, width = pixels.shape[:2]
  xyxy = np.clip(np.asarray(xyxy, np.float32).reshape(-1, 4), 0,
                 np.array([width, height, width, height], np.float32))
  keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
  xyxy = xyxy[keep]
  scale = np.array([width, height, width, height], np.float32)
  cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2,
                           xyxy[:, 2:] - xyxy[:, :2]], 1) / scale
  return {'image': pixels, 'boxes': cxcywh.astype(np.float32),
          'labels': np.asarray(labels, np.int32).reshape(-1)[keep],
          'image_id': np.int64(image_id),
          'orig_size': np.array([height, width], np.int32)}


class _Source(collections.abc.Sequence):
  """Indexing shared by the sources: ints (numpy ones too) and slices."""

  def __getitem__(self, index: Union[int, slice]) -> Any:
    if isinstance(index, slice):
      return [self._read(i) for i in range(*index.indices(len(self)))]
    i = operator.index(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f'index {i} out of range for {len(self)} examples.')
    return self._read(i % len(self))

  @abc.abstractmethod
  def _read(self, index: int) -> Example:
    """Example `index` in `[0, len)`, read now."""

  @abc.abstractmethod
  def annotation_file(self, cache_dir: str) -> str:
    """The split's COCO `instances_*.json`, for pycocotools."""


class CocoFolderSource(_Source):
  """A COCO-format split: its annotation json parsed once, images on access.

  Args:
    image_dir: the folder of the images' `file_name`s.
    ann_file: its `instances_*.json`.

  Raises:
    ValueError: if either does not exist.
  """

  def __init__(self, image_dir: str, ann_file: str):
    for name, path, exists in (('image_dir', image_dir, os.path.isdir),
                               ('ann_file', ann_file, os.path.isfile)):
      if not exists(path):
        raise ValueError(f'{name}={path!r} does not exist.')
    self.image_dir, self.ann_file = image_dir, ann_file
    with open(ann_file) as f:
      coco = json.load(f)
    self.images: List[Dict] = coco['images']
    self.boxes: Dict[int, List] = {im['id']: [] for im in self.images}
    self.labels: Dict[int, List] = {im['id']: [] for im in self.images}
    for a in coco['annotations']:
      if not a.get('iscrowd', 0):
        self.boxes[a['image_id']].append(a['bbox'])
        self.labels[a['image_id']].append(a['category_id'])

  def __len__(self) -> int:
    return len(self.images)

  def _read(self, index: int) -> Example:
    info = self.images[index]
    with Image.open(os.path.join(self.image_dir, info['file_name'])) as image:
      pixels = np.asarray(image.convert('RGB'))
    xywh = np.array(self.boxes[info['id']], np.float32).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    return example_of(pixels, xyxy, self.labels[info['id']], info['id'])

  def annotation_file(self, cache_dir: str) -> str:
    """The split's own json (`cache_dir` unused)."""
    del cache_dir
    return self.ann_file


class TfdsCocoSource(_Source):
  """A split of a tfds dataset with `coco/2017`'s features.

  Args:
    name: tfds name, e.g. 'coco/2017' or 'synthetic_coco'.
    split: tfds split, e.g. 'train', 'validation', 'validation[:500]'.
    data_dir: tfds data directory (None: tfds' default). The dataset must be
      prepared there (`tfds build coco/2017 --data_dir ...`): nothing is
      downloaded.
    category_ids: the category id of each label; default the dataset's
      `category_ids` metadata if it has one, else COCO's 80.

  Raises:
    ValueError: if the dataset lacks coco's features or the category ids do
      not match its labels.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               category_ids: Optional[Sequence[int]] = None):
    from experiments import input_pipeline  # pylint: disable=g-import-not-at-top
    tfds = self._tfds = input_pipeline.import_tfds()
    self.name, self.split, self.data_dir = name, split, data_dir
    self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                    download=False)
    info = self._source.dataset_info
    features = info.features
    objects = features['objects'] if 'objects' in features else {}
    missing = [k for k in ('image', 'image/id') if k not in features] + [
        f'objects/{k}' for k in ('bbox', 'label', 'is_crowd', 'area', 'id')
        if k not in objects]
    if missing:
      raise ValueError(f'tfds dataset {name!r} lacks the coco/2017 features '
                       f'{missing}; it has {features}.')
    self.label_names = tuple(objects['label'].names)
    if category_ids is None:
      category_ids = (info.metadata or {}).get('category_ids',
                                               COCO_CATEGORY_IDS)
    if len(category_ids) != len(self.label_names):
      raise ValueError(
          f'category_ids has {len(category_ids)} ids for the '
          f'{len(self.label_names)} labels of tfds dataset {name!r}.')
    self.category_ids = np.asarray(category_ids, np.int32)

  def __len__(self) -> int:
    return len(self._source)

  def _read(self, index: int) -> Example:
    record = self._source[index]
    objects = record['objects']
    crowd = np.asarray(objects['is_crowd'], bool).reshape(-1)
    pixels = np.asarray(record['image'])
    height, width = pixels.shape[:2]
    # tfds' BBox: (ymin, xmin, ymax, xmax) relative -> (x0, y0, x1, y1) px.
    yxyx = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)[~crowd]
    xyxy = yxyx[:, [1, 0, 3, 2]] * np.array([width, height, width, height],
                                            np.float32)
    labels = np.asarray(objects['label'], np.int64).reshape(-1)[~crowd]
    return example_of(pixels, xyxy, self.category_ids[labels],
                      int(record['image/id']))

  def coco_json(self) -> Dict[str, Any]:
    """The split's ground truth as an `instances_*.json` for pycocotools.

    Images are not decoded: their sizes come from the encoded headers.
    Crowd objects are kept with `iscrowd` 1 (pycocotools ignores detections
    on them); `area` is tfds' (COCO's segment area, truncated to an int).
    """
    raw = self._tfds.data_source(
        self.name, split=self.split, data_dir=self.data_dir, download=False,
        decoders={'image': self._tfds.decode.SkipDecoding()})
    images, annotations = [], []
    for index in range(len(raw)):
      record = raw[index]
      with Image.open(io.BytesIO(record['image'])) as image:
        width, height = image.size
      image_id = int(record['image/id'])
      images.append({'id': image_id, 'height': height, 'width': width,
                     'file_name': _text(record.get('image/filename', b''))})
      objects = record['objects']
      yxyx = np.asarray(objects['bbox'], np.float64).reshape(-1, 4)
      for k, (y0, x0, y1, x1) in enumerate(yxyx):
        annotations.append({
            'id': int(objects['id'][k]), 'image_id': image_id,
            'category_id': int(self.category_ids[int(objects['label'][k])]),
            'bbox': [x0 * width, y0 * height, (x1 - x0) * width,
                     (y1 - y0) * height],
            'area': float(objects['area'][k]),
            'iscrowd': int(bool(objects['is_crowd'][k]))})
    categories = [{'id': int(i), 'name': n}
                  for i, n in zip(self.category_ids, self.label_names)]
    return {'images': images, 'annotations': annotations,
            'categories': categories}

  def annotation_file(self, cache_dir: str) -> str:
    """`cache_dir/NAME_SPLIT.json` (the ground truth), written on first use.

    Every host may call it: the file is written whole, then renamed.
    """
    stem = f'{self.name}_{self.split}'.replace('/', '_').replace(':', '_')
    path = os.path.join(cache_dir, f'{stem}.json')
    if os.path.exists(path):
      with open(path) as f:
        if len(json.load(f)['images']) == len(self):
          return path
    os.makedirs(cache_dir, exist_ok=True)
    temporary = f'{path}.tmp{os.getpid()}'
    with open(temporary, 'w') as f:
      json.dump(self.coco_json(), f)
    os.replace(temporary, path)
    return path


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def open_split(data_config: Any, which: str) -> _Source:
  """The `'train'` or `'eval'` source a config's `data` section names.

  Args:
    data_config: `config.data`: `source` ('folder' or 'tfds'); for a folder
      `root`, `{train,eval}_images` and `{train,eval}_annotations` (relative
      to `root`); for tfds `tfds_name`, `tfds_dir`, `{train,eval}_split`.
    which: 'train' or 'eval'.

  Raises:
    ValueError: for an unknown `source` or `which`, or a folder source
      without `root`.
  """
  if which not in ('train', 'eval'):
    raise ValueError(f"which={which!r}; expected 'train' or 'eval'.")
  kind = data_config.get('source', 'folder')
  if kind == 'tfds':
    return TfdsCocoSource(data_config.tfds_name,
                          data_config[f'{which}_split'],
                          data_config.get('tfds_dir'))
  if kind != 'folder':
    raise ValueError(f'config.data.source={kind!r}; expected one of '
                     f'{SOURCES}.')
  root = data_config.root
  if not root:
    raise ValueError('config.data.root is not set: the folder of a COCO-'
                     'format set (COCO 2017, or make_synthetic_coco OUT), '
                     "or set config.data.source='tfds'.")
  return CocoFolderSource(os.path.join(root, data_config[f'{which}_images']),
                          os.path.join(root,
                                       data_config[f'{which}_annotations']))
