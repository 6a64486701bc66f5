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

A split is checked as it is opened, against the model's classes when given
(`open_split(..., num_classes)`): a category id is a DETR label, valid in
`0..num_classes - 1`. A folder's json is checked whole (`check_coco`: ids,
fields, boxes, duplicates) and any problem raises one `AnnotationError`
naming the file and the first few; an image that does not read raises an
`ImageReadError` naming it.
"""

import abc
import collections.abc
import io
import itertools
import json
import operator
import os
from typing import (Any, Dict, Iterator, List, Optional, Sequence, Tuple,
                    Union)

import numpy as np
from PIL import Image

from experiments.lib import image_decode

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


# -- Annotation checks -------------------------------------------------------
# A COCO json is checked whole when its split is opened: a bad category id
# otherwise surfaces as a NaN loss thousands of steps later, and a bad bbox
# or image id as a numpy or KeyError traceback that names no file. The checks
# go a column at a time at C speed (`map`, a set of types, `np.fromiter`,
# sorting), so COCO train2017's 860k annotations cost about a second; only a
# column found wrong is walked again in Python to name its offenders.

# Problems listed in the message (the rest are counted), and kept on the
# error (`AnnotationError.problems`).
SHOWN_PROBLEMS = 3
KEPT_PROBLEMS = 100

_MISSING = object()
_INT = frozenset([int])  # exactly: json's true is a bool, no int.
_NUMBER = frozenset([int, float])
_KINDS = {dict: 'an object', list: 'a list', str: 'a string', int: 'an int',
          float: 'a float', bool: 'a bool', type(None): 'null'}
_BBOX = '4 numbers [x, y, width, height]'
_INT64 = (-2**63, 2**63)  # ids become int64 (an example's `image_id`).


class AnnotationError(ValueError):
  """A COCO annotation file DETR cannot train or be scored on.

  Its message is one line: the file, the number of problems, the first
  `SHOWN_PROBLEMS` of them (each naming the image or annotation, the field,
  the value and what was expected) and how many more there are.

  Attributes:
    path: the annotation file (or the tfds dataset).
    problems: the first `KEPT_PROBLEMS` problems, a phrase each.
    count: the number of problems in all.
  """

  def __init__(self, path: str, problems: Sequence[str],
               count: Optional[int] = None):
    self.path, self.problems = path, list(problems)[:KEPT_PROBLEMS]
    self.count = len(problems) if count is None else count
    shown = '; '.join(self.problems[:SHOWN_PROBLEMS])
    more = self.count - min(len(self.problems), SHOWN_PROBLEMS)
    if self.count == 1:
      message = f'{path}: {shown}.'
    else:
      message = (f'{path}: {self.count} problems: {shown}'
                 + (f'; and {more} more.' if more else '.'))
    super().__init__(message)


class ImageReadError(ValueError):
  """An image of a COCO folder that does not exist or does not decode."""


class _Problems:
  """Collects problems: the first `KEPT_PROBLEMS` kept, all counted."""

  def __init__(self):
    self.kept: List[str] = []
    self.count = 0

  def add(self, text: str) -> None:
    self.count += 1
    if len(self.kept) < KEPT_PROBLEMS:
      self.kept.append(text)


def _show(value: Any) -> str:
  """`value` as the json spells it, cut short."""
  try:
    text = json.dumps(value)
  except (TypeError, ValueError):
    text = repr(value)
  return text if len(text) <= 40 else text[:37] + '...'


def _kind(value: Any) -> str:
  return _KINDS.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
  return type(value) is int  # pylint: disable=unidiomatic-typecheck


def _column(entries: List[Dict], key: str, default: Any = _MISSING
            ) -> List[Any]:
  """`entry[key]` of each entry (`default` where absent)."""
  try:  # itemgetter in C; a missing key falls back to the slow way.
    return list(map(operator.itemgetter(key), entries))
  except KeyError:
    return [e.get(key, default) for e in entries]


def _wrong_type(values: Sequence[Any], kinds: frozenset) -> List[int]:
  """Indices of the values whose type is not one of `kinds` (exactly)."""
  if set(map(type, values)) <= kinds:
    return []
  return [k for k, value in enumerate(values) if type(value) not in kinds]


def _ints(values: Sequence[Any], low: int, high: int
          ) -> Tuple[Optional[np.ndarray], List[int]]:
  """`(int64 array, [])` of a column of ints in `[low, high)`.

  Otherwise `(None, indices of the values that are not such ints)`.
  """
  if set(map(type, values)) <= _INT:
    try:
      array = np.fromiter(values, np.int64, len(values))
    except OverflowError:  # beyond int64, so beyond [low, high) too.
      array = None
    if array is not None and (not array.size or (
        array.min() >= low and array.max() < high)):
      return array, []
  return None, [k for k, v in enumerate(values)
                if not (_is_int(v) and low <= v < high)]


def _floats(values: Sequence[Any]) -> np.ndarray:
  """float64 of json numbers; an int too large for a float is inf."""
  try:
    return np.fromiter(values, np.float64, len(values))
  except OverflowError:
    return np.array([float(v) if abs(v) < 1e308 else np.inf
                     for v in values], np.float64)


def _repeats(values: Sequence[Any], array: Optional[np.ndarray]) -> bool:
  """Whether an int of `values` is repeated (`array`: them as int64)."""
  if array is None:  # some are not ints: the others, slowly.
    ints = [v for v in values if _is_int(v)]
    return len(set(ints)) < len(ints)
  ordered = np.sort(array)
  return bool((ordered[1:] == ordered[:-1]).any())


def _duplicates(values: Sequence[Any]) -> Iterator[Tuple[int, int]]:
  """`(first, j)` for each int `values[j]` that `values[first]` already had."""
  first: Dict[int, int] = {}
  for j, value in enumerate(values):
    if _is_int(value):
      if value in first:
        yield first[value], j
      else:
        first[value] = j


def _id_range(ids: Sequence[int]) -> str:
  ids = sorted(set(ids))
  if not ids:
    return 'none'
  if ids == list(range(ids[0], ids[-1] + 1)):
    return f'ids {ids[0]}..{ids[-1]}'
  return 'ids ' + ', '.join(map(str, ids[:8])) + (
      ', ...' if len(ids) > 8 else '')


def read_coco_json(path: str) -> Any:
  """The parsed json at `path`.

  Raises:
    AnnotationError: if it is not JSON, naming the line and column.
  """
  try:
    with open(path, 'rb') as f:  # bytes: json tells UTF-8/16/32 itself.
      return json.load(f)
  except json.JSONDecodeError as e:
    raise AnnotationError(path, [
        f'not valid JSON at line {e.lineno} column {e.colno} (character '
        f'{e.pos}): {e.msg}']) from e
  except UnicodeDecodeError as e:
    raise AnnotationError(path, [
        f'not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}'
    ]) from e
  except RecursionError as e:
    raise AnnotationError(path, ['JSON nested too deeply to parse']) from e


def check_coco(coco: Any, path: str, num_classes: Optional[int] = None,
               for_eval: bool = False) -> Dict[str, np.ndarray]:
  """Checks a parsed COCO `instances_*.json` for DETR's training and eval.

  Accepted: a top-level object with
  - `images`: a list of objects with an int `id` (unique) and a non-empty
    string `file_name`; `height` and `width`, if present, positive ints;
  - `annotations`: a list of objects with an int `id` (unique), the int
    `image_id` of one of `images`, an int `category_id` and a `bbox` of 4
    finite numbers `[x, y, width, height]` with width and height >= 0
    (empty boxes are dropped when read); `iscrowd`, if present, 0 or 1 (or
    a json bool); `area`, if present, a finite number >= 0;
  - `categories`: optional for training (it reads only the annotations'
    ids); if present a list of objects with a unique int `id`, and then
    every annotation's `category_id` must be one of them (pycocotools
    scores only the categories listed).
  Ids must fit int64. Other keys (`info`, `segmentation`, ...) are ignored.

  Category ids are DETR's labels: `>= 0`, and with `num_classes` less than
  it (the model's class `num_classes` is "no object"): COCO's ids 1..90
  need 91 classes, the digits' 1..10 need 11.

  Args:
    coco: the parsed json.
    path: the file, for the message.
    num_classes: the model's classes (`config.model.num_classes`); None
      checks only that category ids are not negative (and fit int32).
    for_eval: the split is scored by pycocotools, which also reads
      `categories` and every annotation's `area` and `iscrowd`: they are
      required.

  Returns:
    The annotations' columns: `image_index (n,)` int64 (the position of
    the annotation's image in `images`), `category_id (n,)` int32, `bbox
    (n, 4)` float64 `[x, y, width, height]`, `iscrowd (n,)` bool.

  Raises:
    AnnotationError: naming the problems, the first few in its message.
  """
  if not isinstance(coco, dict):
    raise AnnotationError(path, [
        f'the top level is {_kind(coco)}, expected an object with '
        "'images' and 'annotations'"])
  problems = _Problems()
  lists = {}
  for key, needed in (('images', True), ('annotations', True),
                      ('categories', for_eval)):
    value = coco.get(key, _MISSING)
    if value is _MISSING:
      if needed:
        why = (' (pycocotools reads it to score the eval split)'
               if key == 'categories' else '')
        problems.add(f"no '{key}' key{why}, expected a list of objects")
    elif type(value) is not list:  # pylint: disable=unidiomatic-typecheck
      problems.add(f"'{key}' is {_kind(value)}, expected a list of objects")
    else:
      lists[key] = value
  image_ids = _check_images(lists.get('images'), problems)
  category_ids = _check_categories(lists.get('categories'), for_eval,
                                   problems)
  columns = _check_annotations(lists.get('annotations'), image_ids,
                               category_ids, num_classes, for_eval, problems)
  if problems.count:
    raise AnnotationError(path, problems.kept, problems.count)
  return columns


def _objects(entries: List[Any], key: str, problems: _Problems
             ) -> Tuple[Sequence[int], List[Dict]]:
  """`(indices, entries)` of the entries that are objects; others wrong."""
  bad = _wrong_type(entries, frozenset([dict]))
  for k in bad:
    problems.add(f'{key}[{k}] is {_kind(entries[k])}, expected an object')
  if not bad:
    return range(len(entries)), entries
  skip = set(bad)
  rows = [k for k in range(len(entries)) if k not in skip]
  return rows, [entries[k] for k in rows]


def _check_images(images: Optional[List[Any]], problems: _Problems
                  ) -> Optional[np.ndarray]:
  """Checks `images`; returns their ids (None if any is unusable)."""
  if images is None:
    return None
  rows, entries = _objects(images, 'images', problems)
  ids = _column(entries, 'id')

  def name(j):
    return f'image {ids[j]}' if _is_int(ids[j]) else f'images[{rows[j]}]'

  array, bad = _ints(ids, *_INT64)
  for j in bad:
    problems.add(f"{name(j)} has no 'id', expected an int"
                 if ids[j] is _MISSING else
                 f'{name(j)} has id {_show(ids[j])}, expected an int'
                 + (' within int64' if _is_int(ids[j]) else ''))
  names = _column(entries, 'file_name')
  for j in sorted(_wrong_type(names, frozenset([str])) + (
      [] if all(names) else [j for j, n in enumerate(names) if n == ''])):
    problems.add(f"{name(j)} has no 'file_name', expected a string"
                 if names[j] is _MISSING else
                 f'{name(j)} has file_name {_show(names[j])}, expected a '
                 'non-empty string')
  for key in ('height', 'width'):
    sizes = _column(entries, key, 1)
    for j in _ints(sizes, 1, 2**31)[1]:
      problems.add(f'{name(j)} has {key} {_show(sizes[j])}, expected a '
                   'positive int')
  if _repeats(ids, array):
    for f, j in _duplicates(ids):
      problems.add(f'image id {ids[j]} is shared by file_names '
                   f'{_show(names[f])} and {_show(names[j])}, expected '
                   'unique ids')
  return array if len(rows) == len(images) else None


def _check_categories(categories: Optional[List[Any]], for_eval: bool,
                      problems: _Problems) -> Optional[np.ndarray]:
  """Checks `categories`; returns their ids (None if absent or unusable)."""
  if categories is None:
    return None
  rows, entries = _objects(categories, 'categories', problems)
  ids = _column(entries, 'id')
  array, bad = _ints(ids, *_INT64)
  for j in bad:
    problems.add(f"categories[{rows[j]}] has no 'id', expected an int"
                 if ids[j] is _MISSING else
                 f'categories[{rows[j]}] has id {_show(ids[j])}, expected '
                 'an int')
  if _repeats(ids, array):
    seen = set()
    for i in filter(_is_int, ids):
      if i in seen:
        problems.add(f'category id {i} is listed twice in categories, '
                     'expected unique ids')
      seen.add(i)
  if for_eval and not categories:
    problems.add("'categories' is empty, expected the categories to score "
                 '(pycocotools scores only those listed)')
  return array if len(rows) == len(categories) else None


def _check_annotations(annotations: Optional[List[Any]],
                       image_ids: Optional[np.ndarray],
                       category_ids: Optional[np.ndarray],
                       num_classes: Optional[int], for_eval: bool,
                       problems: _Problems) -> Dict[str, np.ndarray]:
  """Checks `annotations` against the images' and categories' ids."""
  if annotations is None:
    return {}
  rows, entries = _objects(annotations, 'annotations', problems)
  ids = _column(entries, 'id')
  owners = _column(entries, 'image_id')

  def name(j, owner=True):
    of = f' (image {owners[j]})' if owner and _is_int(owners[j]) else ''
    return (f'annotation {ids[j]}' if _is_int(ids[j])
            else f'annotations[{rows[j]}]') + of

  def wrong(j, key, value, expected):
    if value is _MISSING:
      problems.add(f"{name(j)} has no '{key}', expected {expected}")
    else:
      problems.add(f'{key} {_show(value)} of {name(j)} is not {expected}')

  id_array, bad = _ints(ids, *_INT64)
  for j in bad:
    wrong(j, 'id', ids[j], 'an int' + (' within int64' if _is_int(ids[j])
                                      else ''))
  if _repeats(ids, id_array):
    for f, j in _duplicates(ids):
      problems.add(f'annotation id {ids[j]} is shared by annotations'
                   f'[{rows[f]}] and annotations[{rows[j]}], expected unique '
                   'ids')
  owner_array, bad = _ints(owners, *_INT64)
  for j in bad:
    wrong(j, 'image_id', owners[j], 'an int')
  image_index = None
  if image_ids is not None and owner_array is not None:
    # Each annotation's image by binary search in the sorted image ids.
    order = np.argsort(image_ids, kind='stable')
    at = np.searchsorted(image_ids[order], owner_array).clip(
        0, max(len(order) - 1, 0))
    known = (image_ids[order][at] == owner_array if len(order) else
             np.zeros(len(owner_array), bool))
    image_index = order[at] if len(order) else at
    for j in np.flatnonzero(~known):
      problems.add(f'image_id {owners[j]} of {name(j, owner=False)} is not '
                   "the id of any of 'images'")

  labels = _column(entries, 'category_id')
  high = 2**31 if num_classes is None else num_classes  # labels are int32.
  label_array, bad = _ints(labels, 0, high)
  for j in bad:
    if not _is_int(labels[j]):
      wrong(j, 'category_id', labels[j], 'an int')
    elif num_classes is None:
      problems.add(f'category_id {labels[j]} of {name(j)} is outside '
                   '0..2**31-1, expected a class index')
    else:
      problems.add(f'category_id {labels[j]} of {name(j)} is outside the '
                   f"model's classes 0..{num_classes - 1} "
                   f'(config.model.num_classes={num_classes})')
  if category_ids is not None and label_array is not None:
    unlisted = np.flatnonzero(~np.isin(label_array, category_ids))
    listed = _id_range(category_ids.tolist()) if unlisted.size else ''
    for j in unlisted:
      problems.add(f'category_id {labels[j]} of {name(j)} is not one of the '
                   f"file's categories ({listed})")

  boxes = _column(entries, 'bbox')
  four, xywh = _check_boxes(boxes, wrong, problems, name)
  finite = np.isfinite(xywh).all(1)
  for k in np.flatnonzero(~finite):
    problems.add(f'bbox {_show(boxes[four[k]])} of {name(four[k])} is not '
                 '4 finite numbers')
  for k in np.flatnonzero(finite & (xywh[:, 2:] < 0).any(1)):
    problems.add(f'bbox {_show(boxes[four[k]])} of {name(four[k])} has a '
                 'negative width or height, expected both >= 0')

  # pycocotools reads both of every ground truth when it scores.
  default = _MISSING if for_eval else 0
  needed = ' (pycocotools reads it on the eval split)'
  crowd = _column(entries, 'iscrowd', default)
  crowd_array = None
  if set(map(type, crowd)) <= {int, bool}:  # json's true and false too.
    try:
      values = np.fromiter(crowd, np.int64, len(crowd))
    except OverflowError:
      values = np.full(1, 2)
    if ((values == 0) | (values == 1)).all():
      crowd_array = values.astype(bool)
  if crowd_array is None:
    for j, c in enumerate(crowd):
      if type(c) not in (int, bool) or c not in (0, 1):
        wrong(j, 'iscrowd', c, '0 or 1' + (needed if c is _MISSING else ''))
  areas = _column(entries, 'area', default)
  typed = _wrong_type(areas, _NUMBER)
  for j in typed:
    wrong(j, 'area', areas[j],
          'a finite number >= 0' + (needed if areas[j] is _MISSING else ''))
  skip = set(typed)
  numbers = [j for j in range(len(areas)) if j not in skip] if skip else (
      range(len(areas)))
  values = _floats([areas[j] for j in numbers] if skip else areas)
  for k in np.flatnonzero(~(np.isfinite(values) & (values >= 0))):
    wrong(numbers[k], 'area', areas[numbers[k]], 'a finite number >= 0')

  if image_index is None or label_array is None or crowd_array is None or (
      len(four) < len(entries) or len(entries) < len(annotations)):
    return {}  # there are problems: the caller raises.
  return {'image_index': image_index, 'category_id':
          label_array.astype(np.int32), 'bbox': xywh,
          'iscrowd': crowd_array}


def _check_boxes(boxes: List[Any], wrong: Any, problems: _Problems,
                 name: Any) -> Tuple[Sequence[int], np.ndarray]:
  """`(indices, (m, 4) float64)` of the boxes that are 4 numbers.

  The others are problems.
  """
  if (set(map(type, boxes)) <= {list} and set(map(len, boxes)) <= {4} and
      set(map(type, itertools.chain.from_iterable(boxes))) <= _NUMBER):
    try:  # Straight from the lists: no flat list in between.
      return range(len(boxes)), np.fromiter(
          itertools.chain.from_iterable(boxes), np.float64,
          4 * len(boxes)).reshape(-1, 4)
    except OverflowError:  # an int beyond a float: slowly, below.
      four = range(len(boxes))
  else:
    four = []
    for j, b in enumerate(boxes):
      if type(b) is not list:  # pylint: disable=unidiomatic-typecheck
        wrong(j, 'bbox', b, _BBOX)
      elif len(b) != 4:
        problems.add(f'bbox {_show(b)} of {name(j)} has {len(b)} numbers, '
                     f'expected {_BBOX}')
      elif not all(type(x) in _NUMBER for x in b):
        wrong(j, 'bbox', b, _BBOX)
      else:
        four.append(j)
  flat = list(itertools.chain.from_iterable(boxes[j] for j in four))
  return four, _floats(flat).reshape(-1, 4)


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

  The json is checked whole first (`check_coco`); the images are not looked
  at until read (a stat of COCO's 118k files would slow every start).

  Args:
    image_dir: the folder of the images' `file_name`s.
    ann_file: its `instances_*.json`.
    num_classes: the model's classes: category ids must lie in
      `0..num_classes - 1`; None checks only that they are not negative.
    for_eval: the split is scored by pycocotools: `categories` and every
      annotation's `area` and `iscrowd` are required too.

  Raises:
    ValueError: if either does not exist.
    AnnotationError: if `ann_file` is not such a json (one line naming the
      file and its first few problems).
  """

  def __init__(self, image_dir: str, ann_file: str,
               num_classes: Optional[int] = None, for_eval: bool = False):
    for name, path, exists in (('image_dir', image_dir, os.path.isdir),
                               ('ann_file', ann_file, os.path.isfile)):
      if not exists(path):
        raise ValueError(f'{name}={path!r} does not exist.')
    self.image_dir, self.ann_file = image_dir, ann_file
    coco = read_coco_json(ann_file)
    columns = check_coco(coco, ann_file, num_classes, for_eval)
    self.images: List[Dict] = coco['images']
    # The non-crowd boxes and labels as arrays grouped by image (file order
    # kept within one): image k's are rows `_starts[k]:_starts[k + 1]`.
    # As lists COCO train2017's 860k would take ~0.5 GB.
    kept = ~columns['iscrowd']
    rows = columns['image_index'][kept]
    order = np.argsort(rows, kind='stable')
    self._boxes = columns['bbox'][kept][order].astype(np.float32)
    self._labels = columns['category_id'][kept][order]
    self._starts = np.searchsorted(rows[order],
                                   np.arange(len(self.images) + 1))

  def __len__(self) -> int:
    return len(self.images)

  def _read(self, index: int) -> Example:
    info = self.images[index]
    path = os.path.join(self.image_dir, info['file_name'])
    try:
      # Decoded whole, so that a truncated file fails here, with its name;
      # 16-bit and float images keep their range.
      pixels = image_decode.read_image(path)
    except image_decode.UnreadableImageError as e:
      raise ImageReadError(
          f'{path} (image {info["id"]} of {self.ann_file}) could not be '
          f'read: {e.reason}.') from e
    start, stop = self._starts[index], self._starts[index + 1]
    xywh = self._boxes[start:stop]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    return example_of(pixels, xyxy, self._labels[start:stop], info['id'])

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
    num_classes: the model's classes: the category ids must lie in
      `0..num_classes - 1`; None checks only that they are not negative.

  Raises:
    ValueError: if the dataset lacks coco's features or the category ids do
      not match its labels.
    AnnotationError: if a label's category id is outside the classes.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               category_ids: Optional[Sequence[int]] = None,
               num_classes: Optional[int] = None):
    from experiments.lib import tfds_import  # pylint: disable=g-import-not-at-top
    tfds = self._tfds = tfds_import.import_tfds()
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
    # The labels are a ClassLabel, bounded by its names: checking the map
    # checks every object without reading one.
    high = 2**31 if num_classes is None else num_classes
    outside = ('negative, expected a class index' if num_classes is None else
               f"outside the model's classes 0..{num_classes - 1} "
               f'(config.model.num_classes={num_classes})')
    bad = [f'label {k} ({self.label_names[k]!r}) has category_id {c}, '
           f'which is {outside}'
           for k, c in enumerate(self.category_ids.tolist())
           if not 0 <= c < high]
    if bad:
      where = f'tfds dataset {name!r}' + (f' in {data_dir}' if data_dir
                                          else '')
      raise AnnotationError(where, bad)

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


def image_sizes(examples: Sequence[Any]) -> Optional[np.ndarray]:
  """`(N, 2)` heights and widths of a split's images, known without decoding.

  A COCO folder's from its json (when every image states both), an
  in-memory list's from its arrays; None for a source that would have to
  read every image to say (tfds: the batches are then not grouped by
  orientation).
  """
  if isinstance(examples, CocoFolderSource):
    if not all(isinstance(i.get('height'), int) and isinstance(
        i.get('width'), int) for i in examples.images):
      return None
    return np.array([[i['height'], i['width']] for i in examples.images],
                    np.int64).reshape(-1, 2)
  if isinstance(examples, (list, tuple)):
    return np.array([e['image'].shape[:2] for e in examples],
                    np.int64).reshape(-1, 2)
  return None


def open_split(data_config: Any, which: str,
               num_classes: Optional[int] = None) -> _Source:
  """The `'train'` or `'eval'` source a config's `data` section names.

  A folder's json is checked as it is opened (`check_coco`), for pycocotools
  too when `which` is 'eval'; a tfds set's category ids are checked against
  `num_classes`.

  Args:
    data_config: `config.data`: `source` ('folder' or 'tfds'); for a folder
      `root`, `{train,eval}_images` and `{train,eval}_annotations` (relative
      to `root`); for tfds `tfds_name`, `tfds_dir`, `{train,eval}_split`.
    which: 'train' or 'eval'.
    num_classes: `config.model.num_classes`: category ids must lie in
      `0..num_classes - 1`; None checks only that they are not negative.

  Raises:
    ValueError: for an unknown `source` or `which`, or a folder source
      without `root`.
    AnnotationError: for annotations the model cannot train or be scored
      on, naming the file and the first few problems in one line.
  """
  if which not in ('train', 'eval'):
    raise ValueError(f"which={which!r}; expected 'train' or 'eval'.")
  kind = data_config.get('source', 'folder')
  if kind == 'tfds':
    return TfdsCocoSource(data_config.tfds_name,
                          data_config[f'{which}_split'],
                          data_config.get('tfds_dir'),
                          num_classes=num_classes)
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
                                       data_config[f'{which}_annotations']),
                          num_classes, for_eval=which == 'eval')
