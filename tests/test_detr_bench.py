"""The DETR benchmark: its epoch replay is the loop's, its quick run runs.

The two tests that compile DETR training steps take a minute each on a
2-core CPU and are marked slow (`-m slow` runs them).

`experiments.benchmarks.bench_detr` counts the compiles of a COCO epoch by
replaying
`data.train_batches` on image sizes alone; these tests pin the replay to
the real iterator and to the compiles of a real training run, so that the
count cannot drift from what the loop does.
"""

import json

import numpy as np
from PIL import Image
import pytest

from experiments.benchmarks import bench_detr as bench
from experiments.detr.configs import synthetic
from experiments.detr import data
from experiments.detr import sources
from experiments.detr import trainer

# Portrait and landscape images: a batch's padded height comes from one
# kind and its width from the other, so scales give many shapes.
SIZES = ((32, 64), (64, 32), (32, 64), (64, 32), (48, 48), (32, 64),
         (64, 32), (40, 56))
SCALES = (16, 24, 32)
MAX_SIZE = 64
PAD_SIDES = (32, 48, 64)


def _shapes_of(batch):
  """`(H, W)` and each image's unpadded `(h, w)` of a collated batch."""
  valid = ~batch['pixel_mask']
  images = [(int(v.any(1).sum()), int(v.any(0).sum())) for v in valid]
  return batch['images'].shape[1:3], images


@pytest.mark.parametrize('batch_size,flip,grouped', [
    (2, True, False), (3, False, False), (2, True, True), (3, False, True)])
def test_epoch_replay_is_the_loops_batches(batch_size, flip, grouped):
  examples = [{'image': np.zeros((h, w, 3), np.uint8),
               'boxes': np.full((1, 4), 0.5, np.float32),
               'labels': np.ones(1, np.int32), 'image_id': np.int64(i),
               'orig_size': np.array([h, w], np.int32)}
              for i, (h, w) in enumerate(SIZES)]
  crop = data.RandomCrop((40, 56), 24, 48)
  loop = data.train_batches(
      examples, batch_size, 0, 5, SCALES, MAX_SIZE, flip, PAD_SIDES, 2,
      random_crop=crop,
      sizes=sources.image_sizes(examples), grouped=grouped)
  replay = [b for epoch in range(2) for b in bench.epoch_batches(
      np.array(SIZES), batch_size, 5, epoch, SCALES, MAX_SIZE, flip,
      PAD_SIDES, crop, grouped)]
  per_epoch = len(SIZES) // batch_size - grouped
  assert len(replay) == 2 * per_epoch
  for (shape, images), batch in zip(replay, loop):
    assert _shapes_of(batch) == (shape, images)
  if not grouped:
    assert len({shape for shape, _ in replay}) > 1


def test_coco_sizes_are_mostly_640_on_the_longer_side():
  sizes = bench.coco_sizes(10000, seed=1)
  assert sizes.shape == (10000, 2)
  assert np.mean(sizes.max(1) == 640) > 0.9
  assert 0.5 < np.mean(sizes[:, 1] > sizes[:, 0]) < 0.9  # landscape


def test_coco_sizes_read_from_annotations(tmp_path):
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps({'images': [{'id': 1, 'height': 480,
                                          'width': 640},
                                         {'id': 2, 'height': 500,
                                          'width': 375}]}))
  np.testing.assert_array_equal(
      bench.coco_sizes(7, annotations=str(path)), [[480, 640], [500, 375]])


def test_coco_epoch_counts_and_padding():
  config = bench.config_of(bench.RPE, 'auto', quick=False)
  counts = bench.count_shapes(bench.coco_sizes(2000), 2, config,
                              config.input.pad_sides)
  assert counts['batches'] == 1000
  sides = set(config.input.pad_sides)
  assert all(h in sides and w in sides for h, w in counts['shapes'])
  # Pinned for these sizes and the config's seed (the replay itself is
  # pinned to `data.train_batches` above): 20 of the 25 shapes.
  assert len(counts['shapes']) == 20
  assert 0 < counts['nested_padding'] < counts['padding'] < 1
  # Batched by orientation, as the loop does: less padding.
  grouped = bench.count_shapes(bench.coco_sizes(2000), 2, config,
                               config.input.pad_sides, grouped=True)
  assert grouped['batches'] == 999   # two part-batches left out.
  assert grouped['padding'] < counts['padding']
  assert len(grouped['shapes']) < len(counts['shapes'])


@pytest.mark.slow  # two DETR training steps to compile: a minute on 2 cores.
def test_quick_bench_runs(capsys):
  out = bench.main(['--quick', '--sizes', '64x96', '--rounds', '1',
                    '--num_images', '64', '--epoch_batches', '2'])
  printed = capsys.readouterr().out
  assert set(out['step']) == {'64x96'}
  overhead = out['step']['64x96']
  assert np.isfinite(overhead['paired_ratio']) and overhead['paired_ratio'] > 0
  assert 'vs plain, paired median' in printed and 'compiles' in printed
  # What it reports is the replay of 64 COCO-like sizes at 2 per batch,
  # batched by orientation as the loop does, and without for comparison.
  config = bench.config_of(bench.RPE, 'auto', quick=True)
  for grouped, counts, shapes, batches in ((True, 'counts', 10, 31),
                                           (False, 'ungrouped', 13, 32)):
    expected = bench.count_shapes(bench.coco_sizes(64), 2, config,
                                  config.input.pad_sides, grouped)
    assert out['epoch'][counts][2]['shapes'] == expected['shapes']
    assert len(expected['shapes']) == shapes
    assert expected['batches'] == batches


def test_quick_layer_part_runs():
  out = bench.main(['--quick', '--part', 'layer', '--sizes', '64x96',
                    '--rounds', '1', '--layer_impls', 'factored'])
  times = out['layer'][(64, 96)]
  assert set(times) == {'plain', f'{bench.RPE} [factored]'}
  assert all(t > 0 for t in times.values())


def _folder(root):
  """A COCO-format set of `SIZES` images, one box each."""
  (root / 'train').mkdir()
  (root / 'annotations').mkdir()
  images, annotations = [], []
  for i, (h, w) in enumerate(SIZES):
    Image.fromarray(np.full((h, w, 3), 40 * i % 255, np.uint8)).save(
        root / 'train' / f'{i}.png')
    images.append({'id': i, 'file_name': f'{i}.png', 'height': h,
                   'width': w})
    annotations.append({'id': i, 'image_id': i, 'category_id': 1 + i % 10,
                        'bbox': [4, 4, w // 2, h // 2], 'iscrowd': 0,
                        'area': w * h / 4})
  (root / 'annotations' / 'instances_train.json').write_text(json.dumps(
      {'images': images, 'annotations': annotations,
       'categories': [{'id': c, 'name': str(c)} for c in range(1, 11)]}))


@pytest.mark.slow  # a training run compiling two steps: a minute on 2 cores.
def test_training_compiles_once_per_padded_shape(tmp_path):
  _folder(tmp_path)
  config = synthetic.get_config('rpe-2.0-product-ctx-1-k')
  config.data.root = str(tmp_path)
  config.input.update({'batch_size': 4, 'eval_batch_size': 4,
                       'scales': SCALES, 'max_size': MAX_SIZE,
                       'pad_sides': PAD_SIDES, 'max_objects': 2})
  # A model of its own: the jitted steps are cached per (model, recipe),
  # and another test's shapes would count here.
  config.model.update({'backbone_width': 8, 'hidden_dim': 16,
                       'num_heads': 2, 'enc_layers': 1, 'dec_layers': 1,
                       'dim_feedforward': 16, 'num_queries': 3})
  config.total_steps = 2  # one epoch of two batches, of two shapes.
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 100
  config.progress_bar = False
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  shapes = {shape for shape, _ in bench.epoch_batches(
      np.array(SIZES), 4, config.seed, 0, SCALES, MAX_SIZE,
      config.input.flip, PAD_SIDES)}
  assert result['step'] == 2 and len(shapes) == 2
  assert result['compiles'] == len(shapes)
