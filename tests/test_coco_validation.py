"""COCO annotations checked as a split is opened (`sources.check_coco`).

Each test writes a small valid COCO json (3 images, 4 annotations, one of
them crowd) and breaks one thing: the split must refuse to open with one
`AnnotationError` line that names the file, the image or annotation and the
field. Pure Python and numpy: nothing is compiled.
"""

import copy
import json
import pathlib
import types

import numpy as np
import pytest
from PIL import Image

from experiments.detr.configs import coco as coco_config
from experiments.detr.configs import synthetic
from experiments.detr import make_synthetic_coco
from experiments.detr import sources
from experiments.lib import tfds_import

NUM_CLASSES = 10  # category ids 0..9; the file lists 1..9.

VALID = {
    'info': {'description': 'a test set'},
    'images': [
        {'id': 1, 'file_name': 'a.png', 'height': 8, 'width': 10},
        {'id': 2, 'file_name': 'b.png', 'height': 6, 'width': 6},
        {'id': 3, 'file_name': 'c.png'},  # no objects; no size (optional).
    ],
    'annotations': [
        {'id': 1, 'image_id': 1, 'category_id': 3, 'bbox': [1, 1, 4, 2],
         'area': 8, 'iscrowd': 0},
        {'id': 2, 'image_id': 2, 'category_id': 9, 'bbox': [0.5, 0, 3, 3.5],
         'area': 10.5, 'iscrowd': 0},
        {'id': 3, 'image_id': 1, 'category_id': 1, 'bbox': [5, 4, 2, 2],
         'area': 4.0, 'iscrowd': 0},
        {'id': 4, 'image_id': 2, 'category_id': 2, 'bbox': [0, 0, 6, 6],
         'area': 36, 'iscrowd': 1},
    ],
    'categories': [{'id': c, 'name': str(c)} for c in range(1, 10)],
}


@pytest.fixture
def folder(tmp_path):
  """`(image_dir, write)`: `write(coco or text)` gives the json's path."""
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  for info in VALID['images']:
    size = (info.get('width', 4), info.get('height', 4))
    Image.new('RGB', size, (40, 80, 120)).save(image_dir / info['file_name'])
  path = tmp_path / 'instances.json'

  def write(coco):
    if isinstance(coco, bytes):
      path.write_bytes(coco)
    else:
      path.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return str(path)

  return str(image_dir), write


def _broken(change):
  coco = copy.deepcopy(VALID)
  change(coco)
  return coco


def _set(part, index, **fields):
  def change(coco):
    coco[part][index].update(fields)
  return change


def _drop(part, index, key):
  def change(coco):
    del coco[part][index][key]
  return change


def _drop_key(key):
  def change(coco):
    del coco[key]
  return change


def _replace(key, value):
  def change(coco):
    coco[key] = value
  return change


def _duplicate_image(coco):
  coco['images'][2]['id'] = 1


def _duplicate_annotation(coco):
  coco['annotations'][2]['id'] = 1


def _append(part, entry):
  def change(coco):
    coco[part].append(entry)
  return change


# (test id, change, for_eval, the whole problem after 'FILE: ').
DEFECTS = [
    ('category_50_of_10_classes', _set('annotations', 0, category_id=50),
     False, "category_id 50 of annotation 1 (image 1) is outside the "
     "model's classes 0..9 (config.model.num_classes=10)."),
    ('category_minus_1', _set('annotations', 2, category_id=-1), False,
     "category_id -1 of annotation 3 (image 1) is outside the model's "
     'classes 0..9 (config.model.num_classes=10).'),
    ('category_10_is_no_object', _set('annotations', 0, category_id=10),
     False, "category_id 10 of annotation 1 (image 1) is outside the "
     "model's classes 0..9 (config.model.num_classes=10)."),
    ('category_not_an_int', _set('annotations', 1, category_id='9'), False,
     'category_id "9" of annotation 2 (image 2) is not an int.'),
    ('category_a_float', _set('annotations', 1, category_id=9.0), False,
     'category_id 9.0 of annotation 2 (image 2) is not an int.'),
    ('category_not_listed', _set('annotations', 0, category_id=0), False,
     "category_id 0 of annotation 1 (image 1) is not one of the file's "
     'categories (ids 1..9).'),
    ('no_category_id', _drop('annotations', 1, 'category_id'), False,
     "annotation 2 (image 2) has no 'category_id', expected an int."),
    ('duplicate_image_ids', _duplicate_image, False,
     'image id 1 is shared by file_names "a.png" and "c.png", expected '
     'unique ids.'),
    ('duplicate_annotation_ids', _duplicate_annotation, False,
     'annotation id 1 is shared by annotations[0] and annotations[2], '
     'expected unique ids.'),
    ('annotation_of_unknown_image', _set('annotations', 2, image_id=99999),
     False, "image_id 99999 of annotation 3 is not the id of any of "
     "'images'."),
    ('bbox_of_3_numbers', _set('annotations', 0, bbox=[1, 1, 4]), False,
     'bbox [1, 1, 4] of annotation 1 (image 1) has 3 numbers, expected 4 '
     'numbers [x, y, width, height].'),
    ('bbox_not_a_list', _set('annotations', 0, bbox='1 1 4 2'), False,
     'bbox "1 1 4 2" of annotation 1 (image 1) is not 4 numbers [x, y, '
     'width, height].'),
    ('bbox_with_a_string', _set('annotations', 0, bbox=[1, '1', 4, 2]),
     False, 'bbox [1, "1", 4, 2] of annotation 1 (image 1) is not 4 numbers '
     '[x, y, width, height].'),
    ('bbox_with_null', _set('annotations', 0, bbox=[1, None, 4, 2]), False,
     'bbox [1, null, 4, 2] of annotation 1 (image 1) is not 4 numbers '
     '[x, y, width, height].'),
    ('bbox_nan', _set('annotations', 3, bbox=[0, 0, float('nan'), 6]),
     False, 'bbox [0, 0, NaN, 6] of annotation 4 (image 2) is not 4 finite '
     'numbers.'),
    ('bbox_negative_height', _set('annotations', 1, bbox=[0, 3, 3, -1]),
     False, 'bbox [0, 3, 3, -1] of annotation 2 (image 2) has a negative '
     'width or height, expected both >= 0.'),
    ('no_bbox', _drop('annotations', 0, 'bbox'), False,
     "annotation 1 (image 1) has no 'bbox', expected 4 numbers [x, y, "
     'width, height].'),
    ('no_annotation_id', _drop('annotations', 1, 'id'), False,
     "annotations[1] (image 2) has no 'id', expected an int."),
    ('no_image_id', _drop('annotations', 1, 'image_id'), False,
     "annotation 2 has no 'image_id', expected an int."),
    ('annotation_not_an_object', _append('annotations', [1, 2]), False,
     'annotations[4] is a list, expected an object.'),
    ('iscrowd_2', _set('annotations', 1, iscrowd=2), False,
     'iscrowd 2 of annotation 2 (image 2) is not 0 or 1.'),
    ('negative_area', _set('annotations', 2, area=-4.0), False,
     'area -4.0 of annotation 3 (image 1) is not a finite number >= 0.'),
    ('image_without_id', _drop('images', 2, 'id'), False,
     "images[2] has no 'id', expected an int."),
    ('image_id_a_string', _set('images', 2, id='3'), False,
     'images[2] has id "3", expected an int.'),
    ('image_without_file_name', _drop('images', 1, 'file_name'), False,
     "image 2 has no 'file_name', expected a string."),
    ('image_file_name_empty', _set('images', 1, file_name=''), False,
     'image 2 has file_name "", expected a non-empty string.'),
    ('image_height_0', _set('images', 0, height=0), False,
     'image 1 has height 0, expected a positive int.'),
    ('image_width_a_string', _set('images', 1, width='6'), False,
     'image 2 has width "6", expected a positive int.'),
    ('no_annotations_key', _drop_key('annotations'), False,
     "no 'annotations' key, expected a list of objects."),
    ('no_images_key', _drop_key('images'), False,
     "no 'images' key, expected a list of objects."),
    ('images_an_object', _replace('images', {'1': 'a.png'}), False,
     "'images' is an object, expected a list of objects."),
    ('categories_not_a_list', _replace('categories', 'digits'), False,
     "'categories' is a string, expected a list of objects."),
    ('duplicate_category', _append('categories', {'id': 3, 'name': 'x'}),
     False, 'category id 3 is listed twice in categories, expected unique '
     'ids.'),
    ('eval_without_categories', _drop_key('categories'), True,
     "no 'categories' key (pycocotools reads it to score the eval split), "
     'expected a list of objects.'),
    ('eval_without_area', _drop('annotations', 1, 'area'), True,
     "annotation 2 (image 2) has no 'area', expected a finite number >= 0 "
     '(pycocotools reads it on the eval split).'),
    ('eval_without_iscrowd', _drop('annotations', 0, 'iscrowd'), True,
     "annotation 1 (image 1) has no 'iscrowd', expected 0 or 1 (pycocotools"
     ' reads it on the eval split).'),
]


@pytest.mark.parametrize('change,for_eval,problem',
                         [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_each_defect_is_one_line_naming_file_id_and_field(
    folder, change, for_eval, problem):
  image_dir, write = folder
  path = write(_broken(change))
  with pytest.raises(sources.AnnotationError) as caught:
    sources.CocoFolderSource(image_dir, path, NUM_CLASSES, for_eval=for_eval)
  assert str(caught.value) == f'{path}: {problem}'
  assert isinstance(caught.value, ValueError)
  assert (caught.value.path, caught.value.count) == (path, 1)


@pytest.mark.parametrize('text,problem', [
    ('{\n "images": [\n  {"id": 1,}\n ]\n}',
     'not valid JSON at line 3 column 12 (character 26): Expecting property '
     'name enclosed in double quotes.'),
    ('', 'not valid JSON at line 1 column 1 (character 0): Expecting value.'),
    ('[]', "the top level is a list, expected an object with 'images' and "
     "'annotations'."),
    ('null', "the top level is null, expected an object with 'images' and "
     "'annotations'."),
    (b'{"images": "\xff"}', 'not UTF-8 text: byte 0xff at offset 12.'),
], ids=['trailing_comma', 'empty_file', 'top_level_list', 'top_level_null',
        'not_utf8'])
def test_a_file_that_is_no_coco_object(folder, text, problem):
  image_dir, write = folder
  path = write(text)
  with pytest.raises(sources.AnnotationError) as caught:
    sources.CocoFolderSource(image_dir, path, NUM_CLASSES)
  assert str(caught.value) == f'{path}: {problem}'


def test_many_problems_show_the_first_three_and_count_the_rest(folder):
  image_dir, write = folder

  def change(coco):
    for a in coco['annotations']:
      a['category_id'] = 50
    coco['images'][0]['height'] = -1

  path = write(_broken(change))
  with pytest.raises(sources.AnnotationError) as caught:
    sources.CocoFolderSource(image_dir, path, NUM_CLASSES)
  error = caught.value
  message = str(error)
  assert '\n' not in message and error.count == 5 == len(error.problems)
  assert message.startswith(
      f'{path}: 5 problems: image 1 has height -1, expected a positive int; '
      'category_id 50 of annotation 1 (image 1) is outside')
  assert message.endswith('; and 2 more.')
  assert error.problems[-1].startswith('category_id 50 of annotation 4 '
                                       '(image 2)')


def test_a_valid_file_opens_and_reads_its_boxes(folder):
  image_dir, write = folder
  source = sources.CocoFolderSource(image_dir, write(VALID), NUM_CLASSES,
                                    for_eval=True)
  assert len(source) == 3
  first, second, third = source
  # Image 1's two boxes in file order; image 2's crowd box is left out.
  np.testing.assert_array_equal(first['labels'], [3, 1])
  np.testing.assert_allclose(first['boxes'], [[3 / 10, 2 / 8, 4 / 10, 2 / 8],
                                              [6 / 10, 5 / 8, 2 / 10, 2 / 8]])
  np.testing.assert_array_equal(second['labels'], [9])
  np.testing.assert_allclose(second['boxes'],
                             [[2 / 6, 1.75 / 6, 3 / 6, 3.5 / 6]])
  assert third['labels'].shape == (0,) and third['boxes'].shape == (0, 4)
  assert [int(e['image_id']) for e in (first, second, third)] == [1, 2, 3]
  assert first['labels'].dtype == np.int32
  # Optional fields may go: categories, area and iscrowd (for training),
  # an image's size; json's true/false are a crowd flag too.
  lean = copy.deepcopy(VALID)
  del lean['categories']
  for a in lean['annotations']:
    del a['area']
    a['iscrowd'] = bool(a.pop('iscrowd'))
  del lean['images'][0]['height']
  source = sources.CocoFolderSource(image_dir, write(lean), NUM_CLASSES)
  np.testing.assert_array_equal(source[1]['labels'], [9])
  # Without num_classes any category id >= 0 passes.
  wide = _broken(_set('annotations', 0, category_id=50))
  del wide['categories']
  source = sources.CocoFolderSource(image_dir, write(wide))
  np.testing.assert_array_equal(source[0]['labels'], [50, 1])


def test_an_image_that_does_not_read_is_named(folder):
  image_dir, write = folder
  source = sources.CocoFolderSource(image_dir, write(VALID), NUM_CLASSES)
  path = f'{image_dir}/b.png'
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(path)
  with open(path, 'rb') as f:
    png = f.read()
  with open(path, 'wb') as f:  # the header decodes, the pixels do not.
    f.write(png[:len(png) // 2])
  with pytest.raises(sources.ImageReadError,
                     match=rf'^{path} \(image 2 of .*instances.json\) could '
                     'not be read: truncated .*OSError: '):
    source[1]  # pylint: disable=pointless-statement
  with open(path, 'wb') as f:
    f.write(b'no image')
  with pytest.raises(sources.ImageReadError,
                     match=r'image 2 .* not an image Pillow can read'):
    source[1]  # pylint: disable=pointless-statement
  pathlib.Path(image_dir, 'c.png').unlink()
  with pytest.raises(sources.ImageReadError) as caught:
    source[2]  # pylint: disable=pointless-statement
  assert isinstance(caught.value, ValueError)
  assert str(caught.value).startswith(f'{image_dir}/c.png (image 3 of ')
  assert 'cannot be opened (No such file or directory)' in str(caught.value)
  assert source[0]['labels'].tolist() == [3, 1]  # the others still read.


def test_open_split_checks_against_the_model_classes(tmp_path):
  make_synthetic_coco.make(str(tmp_path), num_train=2, num_val=1,
                           sides=(64,))
  config = synthetic.get_config('plain')
  config.data.root = str(tmp_path)
  # The digits' ids 1..10 fit the config's 11 classes (10 is the last).
  classes = config.model.num_classes
  assert classes == make_synthetic_coco.NUM_CLASSES == 11
  assert len(sources.open_split(config.data, 'train', classes)) == 2
  assert len(sources.open_split(config.data, 'eval', classes)) == 1
  with pytest.raises(sources.AnnotationError,
                     match=r"instances_train.json: .*outside the model's "
                     r'classes 0..4 \(config.model.num_classes=5\)'):
    sources.open_split(config.data, 'train', 5)
  # Only the eval split needs what pycocotools reads.
  for split in ('train', 'val'):
    ann = tmp_path / f'annotations/instances_{split}.json'
    coco = json.loads(ann.read_text())
    del coco['categories']
    ann.write_text(json.dumps(coco))
  assert len(sources.open_split(config.data, 'train', classes)) == 2
  with pytest.raises(sources.AnnotationError, match="no 'categories' key"):
    sources.open_split(config.data, 'eval', classes)
  # COCO's ids 1..90 fit DETR's 91 classes.
  assert max(sources.COCO_CATEGORY_IDS) == 90
  assert coco_config.get_config('plain').model.num_classes == 91


def _fake_tfds(names, category_ids=None):
  """A `tensorflow_datasets` stand-in: a dataset's info, no records."""
  label = types.SimpleNamespace(names=names)
  features = {'image': None, 'image/id': None,
              'objects': {'bbox': None, 'label': label, 'is_crowd': None,
                          'area': None, 'id': None}}
  info = types.SimpleNamespace(
      features=features,
      metadata=None if category_ids is None else {
          'category_ids': category_ids})
  source = types.SimpleNamespace(dataset_info=info)
  return types.SimpleNamespace(data_source=lambda *a, **k: source)


def test_tfds_category_ids_are_checked_against_the_classes(monkeypatch):
  monkeypatch.setattr(tfds_import, 'import_tfds',
                      lambda: _fake_tfds(list('abc'), [1, 2, 12]))
  sources.TfdsCocoSource('fake', 'train', num_classes=13)
  with pytest.raises(sources.AnnotationError) as caught:
    sources.TfdsCocoSource('fake', 'train', '/data/tfds', num_classes=10)
  assert str(caught.value) == (
      "tfds dataset 'fake' in /data/tfds: label 2 ('c') has category_id 12, "
      "which is outside the model's classes 0..9 "
      '(config.model.num_classes=10).')
  # coco/2017's own map (COCO's 80 ids, up to 90) against 91 and 90.
  monkeypatch.setattr(tfds_import, 'import_tfds',
                      lambda: _fake_tfds([str(i) for i in range(80)]))
  sources.TfdsCocoSource('coco/2017', 'validation', num_classes=91)
  with pytest.raises(sources.AnnotationError,
                     match=r"label 79 \('79'\) has category_id 90, which is "
                     r"outside the model's classes 0..89"):
    sources.TfdsCocoSource('coco/2017', 'validation', num_classes=90)
