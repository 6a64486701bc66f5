"""DETR training: the offline digits set, padded batches, COCO AP, resume.

The training tests run a tiny DETR (ResNet-14 of width 8, one encoder and
one decoder layer of 32 features, 4 queries, iRPE-K) at 64x64 pixels, on
one padded batch shape, so each run compiles its step once.
"""

import collections
import json

import jax
import numpy as np
import pytest

from experiments import checkpoints
from experiments.detr import coco_eval
from experiments.detr import data
from experiments.detr import evaluate
from experiments.detr import make_synthetic_coco
from experiments.detr import pretrain_backbone
from experiments.detr import train
from experiments.detr.configs import coco as coco_config
from experiments.detr.configs import synthetic
from irpe_jax import convert
import snapshots


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  root = tmp_path_factory.mktemp('digits')
  make_synthetic_coco.make(str(root), num_train=8, num_val=4, sides=(64,))
  return root


def test_synthetic_set_is_coco_with_tight_digit_boxes(digits):
  coco = json.loads((digits / 'annotations/instances_train.json').read_text())
  assert len(coco['images']) == 8
  assert {c['id'] for c in coco['categories']} == set(range(1, 11))
  for a in coco['annotations']:
    x, y, w, h = a['bbox']
    assert 0 <= x and x + w <= 64 and 0 <= y and y + h <= 64 and w * h > 0
  examples = data.load_split(str(digits / 'train'),
                             str(digits / 'annotations/instances_train.json'))
  per_image = collections.Counter(a['image_id'] for a in coco['annotations'])
  assert set(per_image.values()) <= {1, 2, 3, 4}
  for e in examples:
    # Every annotation of the image becomes a target, with its class.
    assert len(e['labels']) == per_image[int(e['image_id'])]
    assert sorted(e['labels']) == sorted(
        a['category_id'] for a in coco['annotations']
        if a['image_id'] == e['image_id'])
    assert (e['boxes'] > 0).all() and (e['boxes'] <= 1).all()


def test_synthetic_set_is_reproducible(digits, tmp_path):
  make_synthetic_coco.make(str(tmp_path), num_train=8, num_val=4, sides=(64,))
  for name in ('instances_train.json', 'instances_val.json'):
    assert ((tmp_path / 'annotations' / name).read_text()
            == (digits / 'annotations' / name).read_text())


def _example(height, width, objects=1):
  return {'image': np.ones((height, width, 3), np.float32),
          'labels': np.arange(objects, dtype=np.int32),
          'boxes': np.full((objects, 4), 0.5, np.float32),
          'image_id': np.int64(7), 'orig_size': np.array([height, width])}


def test_batches_pad_to_the_fixed_shapes_and_mark_the_padding():
  batch = data.collate([_example(50, 70, 2), _example(64, 30)], (64, 96), 3)
  assert batch['images'].shape == (2, 64, 96, 3)
  assert batch['pixel_mask'][0, :50, :70].sum() == 0
  assert batch['pixel_mask'][0].sum() == 64 * 96 - 50 * 70
  np.testing.assert_array_equal(batch['valid'], [[1, 1, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match='larger than every pad_sides'):
    data.collate([_example(100, 10)], (64, 96), 3)
  with pytest.raises(ValueError, match='more than max_objects=1'):
    data.collate([_example(10, 10, 2)], (64,), 1)


def test_flip_mirrors_the_boxes():
  example = dict(_example(8, 8), boxes=np.array([[0.2, 0.3, 0.1, 0.2]],
                                                np.float32),
                 image=np.zeros((8, 8, 3), np.uint8))
  flips = [data.augment(example, np.random.default_rng(s), (), 1333, True)
           for s in range(8)]
  centres = {round(float(f['boxes'][0, 0]), 5) for f in flips}
  assert centres == {0.2, 0.8}


def test_perfect_detections_score_ap_one(digits):
  ann = str(digits / 'annotations/instances_val.json')
  coco = json.loads(open(ann).read())
  detections = [{'image_id': a['image_id'], 'category_id': a['category_id'],
                 'bbox': a['bbox'], 'score': 1.0}
                for a in coco['annotations']]
  ap = coco_eval.coco_ap(ann, detections)
  assert ap['AP'] == pytest.approx(1.0) and ap['AP50'] == pytest.approx(1.0)
  wrong = [dict(d, category_id=d['category_id'] % 10 + 1) for d in detections]
  assert coco_eval.coco_ap(ann, wrong)['AP'] == 0.0


def test_coco_configs_are_the_release_recipe():
  for arg in coco_config.RELEASED:
    config = coco_config.get_config(arg)
    assert config.optim.lr == 1e-4 and config.optim.backbone_lr == 1e-5
    assert config.optim.weight_decay == 1e-4
    assert config.optim.grad_clip_norm == 0.1
    assert config.model.enc_rpe2d == ('' if arg == 'plain' else arg)
  with pytest.raises(ValueError, match='config arg'):
    coco_config.get_config('rpe')


def _tiny_config(root):
  config = synthetic.get_config('rpe-2.0-product-ctx-1-k')
  config.data.root = str(root)
  config.input.update({'batch_size': 4, 'eval_batch_size': 4,
                       'pad_sides': (64,)})
  config.model.update({'backbone_width': 8, 'hidden_dim': 32,
                       'num_heads': 2, 'enc_layers': 1, 'dec_layers': 1,
                       'dim_feedforward': 64, 'num_queries': 4})
  # One recipe for every test here: the jitted steps are cached per (model,
  # recipe), so the tests share one compile.
  config.optim.update({'lr': 1e-3, 'backbone_lr': 1e-3,
                       'freeze_stem': False})   # a backbone from scratch.
  config.total_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 2
  config.progress_bar = False
  return config


def test_a_killed_run_resumes_to_the_same_parameters(digits, tmp_path):
  config = _tiny_config(digits)
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  train.train_and_evaluate(config, str(tmp_path / 'killed'), stop_at_step=2)
  resumed = train.train_and_evaluate(config, str(tmp_path / 'killed'))
  assert whole['step'] == resumed['step'] == 4
  assert whole['compiles'] == 1
  jax.tree.map(np.testing.assert_array_equal, whole['state']['params'],
               resumed['state']['params'])
  # The evaluate command reads a run's workdir as it reads a release .pth.
  restored, name = evaluate.load_variables(config, str(tmp_path / 'killed'))
  assert name == 'checkpoints/4'
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
               {'params': resumed['state']['params'],
                'batch_stats': resumed['state']['batch_stats']})
  first = json.loads((tmp_path / 'whole/metrics.jsonl').read_text()
                     .splitlines()[0])
  # One decoder layer: no auxiliary (`_0`) losses.
  assert not any(name.endswith('_0') for name in first)
  for name in ('train/loss', 'train/loss_ce', 'train/loss_bbox',
               'train/loss_giou', 'train/class_error',
               'train/cardinality_error'):
    assert np.isfinite(first[name])


def test_evaluate_reads_a_run_without_touching_it(digits, tmp_path):
  config = _tiny_config(digits)
  model = train.build_model(config)
  state = jax.device_get(train.init_state(model, train.recipe_of(config, 2),
                                          config))
  run = tmp_path / 'run'
  ckpt = checkpoints.Checkpoints(str(run), 3, False)
  for step in (2, 4):
    ckpt.save(step, dict(state, step=np.asarray(step, np.int32)))
  ckpt.close()
  biggest = max((p for p in (run / 'checkpoints/4').rglob('*')
                 if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:-7])
  before = snapshots.snapshot(run)
  variables, name = evaluate.load_variables(config, str(run))
  assert name.startswith('checkpoints/2 (skipped the damaged checkpoints/4:')
  jax.tree.map(np.testing.assert_array_equal, variables,
               {'params': state['params'],
                'batch_stats': state['batch_stats']})
  # A config of another model: every misfit named, nothing restored.
  deeper = _tiny_config(digits)
  deeper.model.enc_layers = 2
  with pytest.raises(ValueError, match='does not fit the model: it lacks '
                     r'\d+ the model has \(.*encoder/layers_1/'):
    evaluate.load_variables(deeper, str(run))
  # Nothing moved to rejected_checkpoints/, nothing created.
  assert snapshots.snapshot(run) == before
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='holds no checkpoint'):
    evaluate.load_variables(config, str(empty))
  assert not list(empty.iterdir())


def test_a_tiny_detr_overfits_a_few_images(digits, tmp_path):
  config = _tiny_config(digits)
  # Scored on its own training images.
  config.data.update({'eval_images': 'train',
                      'eval_annotations': 'annotations/instances_train.json'})
  config.total_steps = 300
  config.log_every_steps = 10
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 1000
  result = train.train_and_evaluate(config, str(tmp_path))
  losses = [json.loads(line)['train/loss'] for line in
            (tmp_path / 'metrics.jsonl').read_text().splitlines()
            if 'train/loss' in line]
  assert np.mean(losses[-3:]) < np.mean(losses[:2]) / 4, losses
  # The classes and boxes of the training images are recovered.
  assert result['eval']['AP50'] > 0.8, result['eval']
  assert result['eval']['AP'] > 0.5, result['eval']
  # The evaluate command scores the run's last checkpoint as the run did.
  assert evaluate.evaluate_checkpoint(config, str(tmp_path)) == pytest.approx(
      result['eval'])


def test_a_nonfinite_step_is_refused_and_counted(digits):
  config = _tiny_config(digits)
  model = train.build_model(config)
  recipe = train.recipe_of(config, 2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  train_step, _ = train.compiled_steps(model, recipe, mesh)  # shared compile.
  state = train.init_state(model, recipe, config)
  examples = data.load_split(str(digits / 'train'),
                             str(digits / 'annotations/instances_train.json'))
  batch = next(data.train_batches(
      examples, 4, 0, 0, (), 1333, False, (64,), 4))
  batch = {k: batch[k] for k in train.BATCH_KEYS}
  batch['images'][0, 3, 5] = np.nan
  before = jax.device_get(state)
  # The step donates its state: pass a copy.
  after, metrics = train_step(jax.tree.map(np.copy, before), batch)
  after = jax.device_get(after)
  assert not np.isfinite(metrics['loss'])
  assert int(after['nonfinite_steps']) == 1 and int(after['step']) == 1
  jax.tree.map(np.testing.assert_array_equal,
               (after['params'], after['opt_state']),
               (before['params'], before['opt_state']))


def test_a_pretrained_backbone_is_where_training_starts(digits, tmp_path):
  config = _tiny_config(digits)
  backbone, accuracy = pretrain_backbone.pretrain(config, num_steps=2,
                                                  batch_size=8, num_test=8)
  assert 0.0 <= accuracy <= 1.0
  path = str(tmp_path / 'backbone.msgpack')
  convert.save_params(path, backbone)
  config.backbone_init = path
  model = train.build_model(config)
  state = train.init_state(model, train.recipe_of(config, 2), config)
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal,
                 state[collection]['backbone_0'],
                 backbone[collection]['backbone_0'])
  # Everything else is the model's own initialisation.
  scratch = train.init_state(model, train.recipe_of(config, 2),
                             _tiny_config(digits))
  jax.tree.map(np.testing.assert_array_equal,
               state['params']['transformer'],
               scratch['params']['transformer'])


@pytest.mark.slow  # compiles the demo's own DETR twice: minutes on 2 cores.
def test_the_demo_runs_end_to_end_and_draws_its_pictures(tmp_path):
  from experiments.detr import demo  # pylint: disable=g-import-not-at-top
  results = demo.run(str(tmp_path), num_steps=2, num_train=16, num_val=8,
                     seed=3, pretrain_steps=1)
  assert set(results) == {'backbone', 'plain', 'irpe'}
  for name in ('plain', 'irpe'):
    assert 0.0 <= results[name]['AP50'] <= 1.0
    assert results[name]['compiles'] == 1
  for picture in ('detections_plain.png', 'detections_irpe.png',
                  'encoder_attention.png'):
    assert (tmp_path / picture).stat().st_size > 1000
