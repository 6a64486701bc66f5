"""DETR data: lazy folder and tfds sources, pycocotools on tfds, random crop.

The tfds path is the real one (`tfds.data_source` on array_record), read
from a few digits canvases that `make_synthetic_coco` writes both as a
COCO folder and as tfds' `synthetic_coco` (coco/2017's features), offline.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest

from experiments.detr import coco_eval
from experiments.detr.configs import coco as coco_config
from experiments.detr.configs import synthetic
from experiments.detr import data
from experiments.detr import make_synthetic_coco
from experiments.detr import sources

SPLITS = (('train', 'train'), ('validation', 'val'))  # tfds, folder.


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  """`(folder root, tfds data_dir)` of the same 4 + 3 canvases.

  One validation object is marked crowd: both sources must leave it out,
  and the ground truth written for pycocotools must keep it as crowd.
  """
  root = tmp_path_factory.mktemp('digits')
  make_synthetic_coco.make(str(root), num_train=4, num_val=3, sides=(64, 96))
  ann = root / 'annotations/instances_val.json'
  coco = json.loads(ann.read_text())
  coco['annotations'][0]['iscrowd'] = 1
  ann.write_text(json.dumps(coco))
  tfds_dir = tmp_path_factory.mktemp('tfds')
  make_synthetic_coco.make_tfds(str(root), str(tfds_dir))
  return root, tfds_dir


def _folder(root, split):
  return sources.CocoFolderSource(
      str(root / split), str(root / f'annotations/instances_{split}.json'))


def _tfds(tfds_dir, split):
  return sources.TfdsCocoSource('synthetic_coco', split, str(tfds_dir))


def test_coco_category_ids_are_the_80_of_coco_2017():
  ids = sources.COCO_CATEGORY_IDS
  assert len(ids) == 80 and list(ids) == sorted(set(ids))
  assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69,
                                          71, 83}


def test_folder_source_reads_images_on_access(digits, monkeypatch):
  root, _ = digits
  opened = []
  real_read = sources.image_decode.read_image
  monkeypatch.setattr(sources.image_decode, 'read_image',
                      lambda path: opened.append(path) or real_read(path))
  source = _folder(root, 'val')
  assert len(source) == 3 and not opened
  example = source[-1]
  assert len(opened) == 1 and opened[0].endswith('000002.png')
  in_memory = data.load_split(str(root / 'val'),
                              str(root / 'annotations/instances_val.json'))
  for got, want in zip([source[i] for i in range(3)], in_memory):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  np.testing.assert_array_equal(example['image'], in_memory[2]['image'])
  assert [e['image_id'] for e in source[1:]] == [2, 3]
  with pytest.raises(IndexError, match='out of range'):
    source[3]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match='does not exist'):
    sources.CocoFolderSource(str(root / 'nothing'), str(root))


def test_tfds_source_gives_the_folder_examples(digits):
  root, tfds_dir = digits
  for tfds_split, folder_split in SPLITS:
    folder, tfds = _folder(root, folder_split), _tfds(tfds_dir, tfds_split)
    assert len(tfds) == len(folder)
    by_id = {int(e['image_id']): e for e in folder}
    for e in tfds:
      want = by_id.pop(int(e['image_id']))
      np.testing.assert_array_equal(e['image'], want['image'])
      assert e['image'].dtype == np.uint8
      np.testing.assert_allclose(e['boxes'], want['boxes'], atol=1e-6)
      np.testing.assert_array_equal(e['labels'], want['labels'])
      np.testing.assert_array_equal(e['orig_size'], want['orig_size'])
      assert e['labels'].dtype == np.int32 and e['boxes'].dtype == np.float32
    assert not by_id
  # The crowd object is in neither; the digits' ids are 1..10.
  coco = json.loads((root / 'annotations/instances_val.json').read_text())
  crowd = coco['annotations'][0]
  kept = sum(len(e['labels']) for e in _tfds(tfds_dir, 'validation'))
  assert kept == len(coco['annotations']) - 1 and crowd['iscrowd'] == 1
  labels = np.concatenate([e['labels'] for e in _tfds(tfds_dir, 'train')])
  assert labels.min() >= 1 and labels.max() <= 10


def test_tfds_category_ids_must_match_the_labels(digits):
  _, tfds_dir = digits
  with pytest.raises(ValueError, match='category_ids has 80 ids for the 10'):
    sources.TfdsCocoSource('synthetic_coco', 'train', str(tfds_dir),
                           sources.COCO_CATEGORY_IDS)
  source = sources.TfdsCocoSource('synthetic_coco', 'train', str(tfds_dir),
                                  range(11, 21))
  ids = np.concatenate([e['labels'] for e in source])
  folder = np.concatenate([e['labels'] for e in _tfds(tfds_dir, 'train')])
  np.testing.assert_array_equal(np.sort(ids), np.sort(folder) + 10)


def test_tfds_ground_truth_json_scores_perfect_detections_ap_one(
    digits, tmp_path):
  root, tfds_dir = digits
  source = _tfds(tfds_dir, 'validation')
  ann = source.annotation_file(str(tmp_path / 'gt'))
  assert ann == str(tmp_path / 'gt' / 'synthetic_coco_validation.json')
  written = json.loads(open(ann).read())
  truth = json.loads((root / 'annotations/instances_val.json').read_text())
  assert sorted((i['id'], i['height'], i['width'], i['file_name'])
                for i in written['images']) == sorted(
                    (i['id'], i['height'], i['width'], i['file_name'])
                    for i in truth['images'])
  got = sorted(written['annotations'], key=lambda a: a['id'])
  want = sorted(truth['annotations'], key=lambda a: a['id'])
  assert [(a['id'], a['image_id'], a['category_id'], a['iscrowd'],
           a['area']) for a in got] == [
               (a['id'], a['image_id'], a['category_id'], a['iscrowd'],
                a['area']) for a in want]
  np.testing.assert_allclose([a['bbox'] for a in got],
                             [a['bbox'] for a in want], atol=1e-4)
  assert {c['id'] for c in written['categories']} == set(range(1, 11))

  detections = []
  for e in source:
    height, width = e['orig_size']
    for (cx, cy, w, h), label in zip(e['boxes'], e['labels']):
      detections.append({
          'image_id': int(e['image_id']), 'category_id': int(label),
          'bbox': [(cx - w / 2) * width, (cy - h / 2) * height, w * width,
                   h * height], 'score': 1.0})
  ap = coco_eval.coco_ap(ann, detections)
  assert ap['AP'] == pytest.approx(1.0) and ap['AP75'] == pytest.approx(1.0)
  wrong = [dict(d, category_id=d['category_id'] % 10 + 1)
           for d in detections]
  assert coco_eval.coco_ap(ann, wrong)['AP'] == 0.0
  # Written once: a second call reuses the file.
  stamp = os.stat(ann).st_mtime_ns
  assert source.annotation_file(str(tmp_path / 'gt')) == ann
  assert os.stat(ann).st_mtime_ns == stamp


def test_open_split_follows_the_config(digits):
  root, tfds_dir = digits
  config = synthetic.get_config('plain')
  with pytest.raises(ValueError, match='config.data.root is not set'):
    sources.open_split(config.data, 'train')
  config.data.root = str(root)
  train = sources.open_split(config.data, 'train')
  evaluation = sources.open_split(config.data, 'eval')
  assert isinstance(train, sources.CocoFolderSource)
  assert (len(train), len(evaluation)) == (4, 3)
  assert evaluation.annotation_file('unused') == str(
      root / 'annotations/instances_val.json')
  config.data.update({'source': 'tfds', 'tfds_name': 'synthetic_coco',
                      'tfds_dir': str(tfds_dir)})
  train = sources.open_split(config.data, 'train')
  evaluation = sources.open_split(config.data, 'eval')
  assert isinstance(train, sources.TfdsCocoSource)
  assert (train.split, evaluation.split) == ('train', 'validation')
  assert (len(train), len(evaluation)) == (4, 3)
  with pytest.raises(ValueError, match="which='test'"):
    sources.open_split(config.data, 'test')
  config.data.source = 'files'
  with pytest.raises(ValueError, match="source='files'"):
    sources.open_split(config.data, 'train')
  coco = coco_config.get_config('plain').data
  assert (coco.source, coco.tfds_name, coco.train_split, coco.eval_split) == (
      'folder', 'coco/2017', 'train', 'validation')


def test_train_batches_from_tfds_resume_and_ignore_threads(digits):
  _, tfds_dir = digits
  source = _tfds(tfds_dir, 'train')

  def batches(start, threads, count):
    stream = data.train_batches(source, 2, start, 3, (48, 64), 100, True,
                                (64, 96), 4, num_threads=threads)
    return [next(stream) for _ in range(count)]

  whole = batches(0, 0, 3)
  assert whole[0]['images'].shape[0] == 2
  assert whole[0]['images'].shape[1:3] in ((64, 64), (64, 96), (96, 64),
                                           (96, 96))
  assert all(b['valid'].any() for b in whole)
  for got, want in zip(batches(1, 0, 2) + batches(0, 2, 3),
                       whole[1:] + whole):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def _painted(height=160, width=200):
  """An image with 4 boxes painted 1..4 (its label), as relative boxes."""
  image = np.zeros((height, width, 3), np.uint8)
  xyxy = np.array([[10, 20, 60, 50], [100, 5, 190, 150], [70, 90, 90, 130],
                   [0, 140, 30, 160]])
  for k, (x0, y0, x1, y1) in enumerate(xyxy):
    image[y0:y1, x0:x1] = k + 1
  scale = np.array([width, height, width, height])
  rel = xyxy / scale
  boxes = np.concatenate([(rel[:, :2] + rel[:, 2:]) / 2,
                          rel[:, 2:] - rel[:, :2]], 1)
  return {'image': image, 'boxes': boxes.astype(np.float32),
          'labels': np.arange(1, 5, dtype=np.int32),
          'image_id': np.int64(1), 'orig_size': np.array([height, width])}


def test_random_size_crop_keeps_boxes_on_their_pixels():
  example = _painted()
  removed = kept = 0
  for seed in range(40):
    out = data.random_size_crop(example, np.random.default_rng(seed), 40, 120)
    height, width = out['image'].shape[:2]
    assert 40 <= width <= 120 and 40 <= height <= 120
    assert out['boxes'].shape == (len(out['labels']), 4)
    present = set(np.unique(out['image'][..., 0])) - {0}
    assert set(out['labels'].tolist()) == present
    removed += 4 - len(present)
    for (cx, cy, w, h), label in zip(out['boxes'], out['labels']):
      rows, cols = np.nonzero(out['image'][..., 0] == label)
      np.testing.assert_allclose(
          [(cx - w / 2) * width, (cy - h / 2) * height,
           (cx + w / 2) * width, (cy + h / 2) * height],
          [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1],
          atol=1e-3)
      kept += 1
    again = data.random_size_crop(example, np.random.default_rng(seed), 40,
                                  120)
    for key in out:
      np.testing.assert_array_equal(again[key], out[key])
  assert removed and kept


def test_crop_removes_boxes_outside_and_clips_the_rest():
  out = data.crop(_painted(), 30, 80, 70, 100)  # rows 30..100, cols 80..180.
  assert out['image'].shape == (70, 100, 3)
  # Box 1 (x 10..60) is left of the window, box 4 below it; 2 and 3 clip.
  np.testing.assert_array_equal(out['labels'], [2, 3])
  np.testing.assert_allclose(out['boxes'], [[0.6, 0.5, 0.8, 1.0],
                                            [0.05, 65 / 70, 0.1, 10 / 70]],
                             atol=1e-6)
  # A window ending on a box's first row leaves nothing of it.
  np.testing.assert_array_equal(data.crop(_painted(), 30, 80, 60, 100)[
      'labels'], [2])
  empty = data.crop(_painted(), 0, 0, 5, 5)
  assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,)
  batch = data.collate([data.augment(empty, np.random.default_rng(0), (),
                                     1333, False)], (64,), 2)
  assert not batch['valid'].any() and batch['boxes'].shape == (1, 2, 4)


def test_augment_with_the_release_crop_branch():
  example = _painted(500, 700)
  crop = data.RandomCrop((400, 500, 600), 384, 600)
  sizes, cropped = set(), 0
  for seed in range(12):
    out = data.augment(example, np.random.default_rng(seed), (480, 512),
                       1333, True, crop)
    height, width = out['image'].shape[:2]
    sizes.add(min(height, width))
    cropped += abs(width / height - 700 / 500) > 0.01
    assert out['image'].dtype == np.float32
    assert len(out['boxes']) == len(out['labels']) <= 4
    assert ((out['boxes'] >= 0) & (out['boxes'] <= 1)).all()
    again = data.augment(example, np.random.default_rng(seed), (480, 512),
                         1333, True, crop)
    np.testing.assert_array_equal(again['image'], out['image'])
  assert sizes == {480, 512} and 0 < cropped < 12
  # Without a crop the generator's stream is that of flip and scale alone.
  plain = data.augment(example, np.random.default_rng(1), (480, 512), 1333,
                       True)
  rng = np.random.default_rng(1)
  rng.random()
  assert min(plain['image'].shape[:2]) == int(rng.choice((480, 512)))
  with pytest.raises(ValueError, match='min_size <= max_size'):
    data.RandomCrop((400,), 600, 384)


def test_crop_config():
  assert data.crop_of(coco_config.get_config('plain').input) == (
      data.RandomCrop((400, 500, 600), 384, 600))
  assert data.crop_of(synthetic.get_config('plain').input) is None


def test_prefetched_keeps_order_and_raises():
  def slow_first(k):
    if not k:
      time.sleep(0.05)  # done after the ones made beside it.
    return k * k

  for threads in (0, 3):
    assert list(data.prefetched(slow_first, range(7), threads)) == [
        k * k for k in range(7)]

  def fails(k):
    if k == 2:
      raise KeyError('bad example')
    return k

  stream = data.prefetched(fails, range(5), 2)
  assert [next(stream), next(stream)] == [0, 1]
  with pytest.raises(KeyError, match='bad example'):
    next(stream)
  with pytest.raises(ValueError, match='num_threads=-1'):
    data.prefetched(fails, range(5), -1)


def test_make_synthetic_coco_tfds_refuses_other_sizes(digits, tmp_path):
  root, tfds_dir = digits
  other = tmp_path / 'other'
  shutil.copytree(root, other)
  coco = json.loads((other / 'annotations/instances_train.json').read_text())
  coco['images'] = coco['images'][:2]
  (other / 'annotations/instances_train.json').write_text(json.dumps(coco))
  with pytest.raises(ValueError, match='already holds synthetic_coco'):
    make_synthetic_coco.make_tfds(str(other), str(tfds_dir))
