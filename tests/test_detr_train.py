"""DETR training: the offline digits set, padded batches, COCO AP, resume.

The training tests run a tiny DETR (ResNet-14 of width 8, one encoder and
one decoder layer of 32 features, 4 queries, iRPE-K) at 64x64 pixels, on
one padded batch shape, so each run compiles its step once.
"""

import collections
import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.detr import coco_eval
from experiments.detr.configs import coco as coco_config
from experiments.detr import data
from experiments.detr import evaluate
from experiments.detr import make_synthetic_coco
from experiments.detr import pretrain_backbone
from experiments.detr import trainer
from experiments.lib import checkpoints
from irpe_jax import convert
import detr_tiny
import snapshots

REPO = pathlib.Path(__file__).resolve().parents[1]


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
  return detr_tiny.get_config(str(root))


@pytest.fixture(scope='module')
def whole_run(digits, tmp_path_factory):
  """The tiny config's 4 steps in this process (4 CPU devices), evaluated
  at the end (so `best/4` holds its variables)."""
  config = _tiny_config(digits)
  config.eval_every_steps = 0
  workdir = tmp_path_factory.mktemp('whole')
  return workdir, trainer.train_and_evaluate(config, str(workdir))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_cli(commands, tmp_path, devices):
  """Runs command lines at once (the processes of one run); their logs."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  logs = [open(tmp_path / f'log_{i}.txt', 'w+') for i in range(len(commands))]
  # Output to files, not pipes: a full pipe would stall one process and,
  # at the next collective, the other.
  procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
           for c, log in zip(commands, logs)]
  texts = []
  for proc, log in zip(procs, logs):
    try:
      proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
    log.seek(0)
    texts.append(log.read())
    log.close()
    assert proc.returncode == 0, texts[-1][-3000:]
  return texts


def test_two_processes_of_the_train_command_train_as_one(digits, whole_run,
                                                         tmp_path):
  """`--coordinator_address` joins two processes of 2 devices into one run
  of 4, whose parameters, eval and best checkpoint are the one-process
  run's."""
  port = _free_port()
  workdir = tmp_path / 'wd_2x2'
  base = [sys.executable, '-m', 'experiments.detr.train', '--config',
          f'tests/detr_tiny.py:{digits}', '--config.eval_every_steps=0',
          '--workdir', str(workdir), '--coordinator_address',
          f'localhost:{port}', '--num_processes', '2']
  logs = _run_cli([base + ['--process_id', str(i)] for i in range(2)],
                  tmp_path, devices=2)
  for i, log in enumerate(logs):
    assert f'Process {i} of 2, 2 local / 4 global devices (cpu).' in log
    assert 'steps from step 0 on 4 devices of 2 processes' in log
  state, name = checkpoints.read_run(str(workdir), ('checkpoints',))
  assert name == 'checkpoints/4'
  one = whole_run[1]
  # Adam's steps are lr-sized (1e-3) whatever the gradient's size: a
  # near-zero gradient summed in another order on 2 x 2 devices than on 4
  # moves a parameter by a fraction of a percent of a step (seen: 2.2e-6).
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5,
                                 atol=1e-5),
               state['params'], jax.device_get(one['state']['params']))
  assert sorted(os.listdir(workdir / 'best')) == ['4']
  rows = [json.loads(line) for line in
          (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'train/loss' in r] == [1, 2, 3, 4]
  evals = [r for r in rows if 'eval/AP' in r]
  assert [r['step'] for r in evals] == [4]
  assert evals[0]['eval/AP50'] == pytest.approx(one['eval']['AP50'],
                                                abs=1e-6)


def test_the_loop_keeps_the_best_ap_and_a_rate_of_training_alone(digits,
                                                                  whole_run):
  workdir, one = whole_run
  assert sorted(os.listdir(workdir / 'best')) == ['4']
  rows = [json.loads(line) for line in
          (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_rows = [r for r in rows if 'train/loss' in r]
  assert all(r['train/images_per_sec'] == pytest.approx(
      4 * r['train/steps_per_sec']) for r in train_rows)
  variables, name = evaluate.load_variables(_tiny_config(digits),
                                            str(workdir))
  assert name == 'best/4'
  jax.tree.map(np.testing.assert_array_equal, variables['params'],
               jax.device_get(one['state']['params']))


def test_the_evaluate_command_skips_a_damaged_best_and_says_so(
    digits, whole_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(whole_run[0], workdir)
  snapshots.flip_a_byte(workdir / 'best' / '4')
  before = snapshots.snapshot(workdir)
  log, = _run_cli([[sys.executable, '-m', 'experiments.detr.evaluate',
                    '--config', f'tests/detr_tiny.py:{digits}',
                    '--checkpoint', str(workdir)]], tmp_path, devices=1)
  assert 'Evaluating checkpoints/4 (skipped the damaged best/4:' in log
  assert 'differs from its checksum' in log
  ap50 = [line.split()[1] for line in log.splitlines()
          if line.split()[:1] == ['AP50']]
  assert float(ap50[0]) == pytest.approx(whole_run[1]['eval']['AP50'],
                                         abs=1e-3)
  assert snapshots.snapshot(workdir) == before


def test_a_killed_run_resumes_to_the_same_parameters(digits, whole_run,
                                                     tmp_path):
  config = _tiny_config(digits)
  whole = whole_run[1]
  trainer.train_and_evaluate(config, str(tmp_path / 'killed'), stop_at_step=2)
  resumed = trainer.train_and_evaluate(config, str(tmp_path / 'killed'))
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
  first = json.loads((whole_run[0] / 'metrics.jsonl').read_text()
                     .splitlines()[0])
  # One decoder layer: no auxiliary (`_0`) losses.
  assert not any(name.endswith('_0') for name in first)
  for name in ('train/loss', 'train/loss_ce', 'train/loss_bbox',
               'train/loss_giou', 'train/class_error',
               'train/cardinality_error'):
    assert np.isfinite(first[name])


def test_evaluate_reads_a_run_without_touching_it(digits, tmp_path):
  config = _tiny_config(digits)
  model = trainer.build_model(config)
  state = jax.device_get(trainer.init_state(model, trainer.recipe_of(config, 2),
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
  result = trainer.train_and_evaluate(config, str(tmp_path))
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
  model = trainer.build_model(config)
  recipe = trainer.recipe_of(config, 2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  train_step, _ = trainer.compiled_steps(model, recipe, mesh)  # shared compile.
  state = trainer.init_state(model, recipe, config)
  examples = data.load_split(str(digits / 'train'),
                             str(digits / 'annotations/instances_train.json'))
  batch = next(data.train_batches(
      examples, 4, 0, 0, (), 1333, False, (64,), 4))
  batch = {k: batch[k] for k in trainer.BATCH_KEYS}
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
  model = trainer.build_model(config)
  state = trainer.init_state(model, trainer.recipe_of(config, 2), config)
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal,
                 state[collection]['backbone_0'],
                 backbone[collection]['backbone_0'])
  # Everything else is the model's own initialisation.
  scratch = trainer.init_state(model, trainer.recipe_of(config, 2),
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
