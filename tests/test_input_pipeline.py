"""experiments.deit.input_pipeline and .optim: order, shards, mixing.

The tfds tests read a dataset prepared offline in a temporary data_dir by a
real builder (`experiments.deit.make_tfds_dataset`), through `tfds.data_source`
as training does: `tfds.testing.mock_data` replaces that path and hid a
crash in it.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from experiments.deit.configs import common
from experiments.deit import input_pipeline
from experiments.deit import optim
from experiments.lib import tfds_import
import irpe_jax
from irpe_jax import models

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_source(num_examples=12):
  """Random-access list of examples whose label is their index."""
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 255, (12, 10, 3)).astype(np.uint8),
           'label': i} for i in range(num_examples)]


def make_config(**overrides):
  """The recipe's input config (its defaults), shrunk."""
  config = common.deit_recipe().input
  config.update(batch_size=4, eval_batch_size=4, image_size=8,
                random_erasing=0.5, num_threads=2, prefetch=2,
                crop_fraction=1.0)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A data_dir holding `synthetic_cifar10` (24 train, 10 test), records."""
  from experiments.deit import make_tfds_dataset  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  make_tfds_dataset.prepare(str(data_dir), num_train=24, num_test=10)
  return data_dir


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def fake_hosts(monkeypatch, count, index):
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  monkeypatch.setattr(jax, 'process_index', lambda: index)


def test_global_batch_does_not_depend_on_the_number_of_hosts(monkeypatch):
  source, config = make_source(), make_config()
  whole = take(input_pipeline.train_iterator(source, config, 0, 5, seed=3), 5)
  parts = []
  for host in range(2):
    fake_hosts(monkeypatch, 2, host)
    parts.append(take(input_pipeline.train_iterator(source, config, 0, 5,
                                                    seed=3), 5))
  for step in range(5):
    assert parts[0][step]['image'].shape == (2, 8, 8, 3)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]),
          whole[step][key])


def test_resuming_at_a_step_continues_the_same_stream():
  source, config = make_source(), make_config()
  first = take(input_pipeline.train_iterator(source, config, 0, 5, seed=1), 5)
  resumed = take(input_pipeline.train_iterator(source, config, 3, 5, seed=1),
                 2)
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


@pytest.mark.parametrize('source, seed, match', [([], 0, 'no examples'),
                                                (make_source(), -1, 'seed')])
def test_train_iterator_rejects_what_would_fail_in_a_worker(source, seed,
                                                            match):
  with pytest.raises(ValueError, match=match):
    input_pipeline.train_iterator(source, make_config(), 0, 1, seed=seed)


def test_each_epoch_is_a_new_permutation_of_all_examples():
  source, config = make_source(12), make_config()
  batches = take(input_pipeline.train_iterator(source, config, 0, 6, seed=0),
                 6)
  labels = np.concatenate([b['label'] for b in batches])
  epoch_0, epoch_1 = labels[:12], labels[12:]
  assert sorted(epoch_0) == sorted(epoch_1) == list(range(12))
  assert not np.array_equal(epoch_0, epoch_1)


def test_eval_batches_cover_each_example_once_across_hosts(monkeypatch):
  source, config = make_source(10), make_config()
  seen, lengths = [], []
  for host in range(2):
    fake_hosts(monkeypatch, 2, host)
    batches = list(input_pipeline.eval_batches(source, config))
    lengths.append(len(batches))
    for batch in batches:
      assert batch['image'].shape == (2, 8, 8, 3)
      seen += batch['label'][batch['mask'] > 0].tolist()
  assert lengths[0] == lengths[1]
  assert sorted(seen) == list(range(10))


def constant_images(batch=4, size=8):
  """Image i is the constant i; one-hot targets of class i."""
  images = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None,
                                                                  None, None],
                            (batch, size, size, 1))
  return images, jax.nn.one_hot(jnp.arange(batch), batch)


@pytest.mark.parametrize('seed', range(4))
def test_cutmix_targets_match_the_share_of_pixels(seed):
  images, targets = constant_images()
  mixed, mixed_targets = input_pipeline.mixup_cutmix(
      jax.random.key(seed), images, targets, mixup_alpha=0.0,
      cutmix_alpha=1.0)
  for i in range(4):  # image i is mixed with image 3 - i.
    np.testing.assert_allclose(mixed_targets[i, i], jnp.mean(mixed[i] == i),
                               atol=1e-6)
    np.testing.assert_allclose(mixed_targets[i, 3 - i],
                               jnp.mean(mixed[i] == 3 - i), atol=1e-6)
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, atol=1e-6)


def test_mixup_blends_images_and_targets_with_one_lambda():
  images, targets = constant_images()
  mixed, mixed_targets = input_pipeline.mixup_cutmix(
      jax.random.key(0), images, targets, mixup_alpha=0.8, cutmix_alpha=0.0)
  lam = mixed_targets[0, 0]
  assert 0.0 <= lam <= 1.0
  for i in range(4):
    np.testing.assert_allclose(mixed[i], lam * i + (1 - lam) * (3 - i),
                               atol=1e-5)
    np.testing.assert_allclose(mixed_targets[i, i], lam, atol=1e-6)


def test_smooth_one_hot_is_timm_label_smoothing():
  targets = input_pipeline.smooth_one_hot(jnp.array([2]), 5, 0.1)
  np.testing.assert_allclose(targets, [[0.02, 0.02, 0.92, 0.02, 0.02]],
                             atol=1e-6)


def test_image_folder_source_labels_sorted_class_folders(tmp_path):
  for name, colour in (('b_cat', 200), ('a_dog', 50)):
    (tmp_path / 'train' / name).mkdir(parents=True)
    Image.fromarray(np.full((5, 6), colour, np.uint8)).save(
        tmp_path / 'train' / name / 'x.png')
  source, num_classes = input_pipeline.get_source(f'folder:{tmp_path}',
                                                  'train')
  assert num_classes == 2 and len(source) == 2
  example = source[0]
  assert example['label'] == 0 and example['image'].shape == (5, 6, 3)
  assert example['image'][0, 0, 0] == 50  # a_dog comes first.
  with pytest.raises(ValueError, match='does not exist'):
    input_pipeline.get_source(f'folder:{tmp_path}', 'test')


def replay_images(split, count, seed=0):
  """The images `make_tfds_dataset` generated for `split`, by their id."""
  from experiments.deit import make_tfds_dataset  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
  return {f'{split}_{i:06d}': make_tfds_dataset.make_image(i % 10, rng)
          for i in range(count)}


def test_tfds_source_reads_a_dataset_prepared_offline(tfds_dir):
  source, num_classes = input_pipeline.get_source('synthetic_cifar10',
                                                  'train', str(tfds_dir))
  assert num_classes == 10 and len(source) == 24
  written = replay_images('train', 24)
  labels = []
  for i in range(len(source)):
    example = source[i]
    key = example['id'].decode() if isinstance(example['id'], bytes) else (
        example['id'])
    assert example['image'].dtype == np.uint8
    np.testing.assert_array_equal(example['image'], written[key])
    assert example['label'] == int(key[-6:]) % 10
    labels.append(int(example['label']))
  assert sorted(labels) == sorted(list(range(10)) * 2 + list(range(4)))
  half, _ = input_pipeline.get_source('synthetic_cifar10', 'test[:50%]',
                                      str(tfds_dir))
  assert len(half) == 5


def test_train_and_eval_batches_from_a_tfds_source(tfds_dir):
  train_source, _ = input_pipeline.get_source('synthetic_cifar10', 'train',
                                              str(tfds_dir))
  eval_source, _ = input_pipeline.get_source('synthetic_cifar10', 'test',
                                             str(tfds_dir))
  config = make_config(batch_size=8, randaugment_ops=3,
                       randaugment_magnitude=10.0, random_erasing=1.0)
  batches = take(input_pipeline.train_iterator(train_source, config, 0, 3,
                                               seed=0), 3)
  for batch in batches:
    assert batch['image'].shape == (8, 8, 8, 3)
    assert np.all(np.isfinite(batch['image']))
  # 3 batches of 8 are one epoch of the 24 training examples.
  assert sorted(np.concatenate([b['label'] for b in batches]).tolist()) == (
      sorted(int(train_source[i]['label']) for i in range(24)))
  seen = []
  for batch in input_pipeline.eval_batches(eval_source, config):
    seen += batch['label'][batch['mask'] > 0].tolist()
  assert sorted(seen) == sorted(int(eval_source[i]['label'])
                                for i in range(10))


def test_a_prepared_dataset_is_read_by_name_without_its_builder(tfds_dir):
  # What `python -m experiments.deit.train --config.dataset=synthetic_cifar10`
  # does: a fresh process that never imports the builder's module.
  code = ('import sys\n'
          'from experiments.deit import input_pipeline\n'
          'source, n = input_pipeline.get_source("synthetic_cifar10", "test",'
          ' sys.argv[1])\n'
          'assert "experiments.deit.make_tfds_dataset" not in sys.modules\n'
          'print(len(source), n, source[0]["image"].shape)\n')
  run = subprocess.run([sys.executable, '-c', code, str(tfds_dir)], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.splitlines()[-1] == '10 10 (32, 32, 3)'


@pytest.mark.parametrize('missing', ['importlib_resources', 'array_record'])
def test_import_tfds_names_a_package_tfds_needs_but_does_not_install(
    monkeypatch, missing):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *args: None if name == missing
                      else find_spec(name, *args))
  with pytest.raises(ImportError, match=f'pip install {missing}'):
    tfds_import.import_tfds()


def test_setup_declares_every_package_the_data_path_imports():
  import configparser  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  setup = configparser.ConfigParser()
  setup.read(REPO / 'setup.cfg')
  declared = {re.split(r'[<>=!~ ;\[]', line.strip())[0].lower()
              .replace('_', '-')
              for line in setup['options.extras_require']['experiments']
              .splitlines() if line.strip() and not line.strip().startswith(
                  '#')}
  for package in ('tensorflow-datasets', 'importlib-resources',
                  'array-record', 'grain', 'pillow', 'ml-collections'):
    assert package in declared, package


def test_train_runs_on_a_tfds_dataset_at_full_augmentation(tfds_dir,
                                                          tmp_path):
  from experiments.deit import trainer  # pylint: disable=g-import-not-at-top
  import train_worker  # pylint: disable=g-import-not-at-top
  config = train_worker.tiny_config('synthetic_cifar10')
  config.data_dir = str(tfds_dir)
  config.input.update(randaugment_ops=3, randaugment_magnitude=10.0,
                      random_erasing=1.0)
  config.total_steps = 2
  out = trainer.train_and_evaluate(config, str(tmp_path))
  assert out['step'] == 2
  assert 0.0 <= out['eval']['top1'] <= 1.0
  assert np.isfinite(out['eval']['loss'])


def test_no_weight_decay_on_biases_norms_tokens_and_irpe_tables():
  model = models.VisionTransformer(
      img_size=8, patch_size=4, num_classes=3, embed_dim=8, depth=1,
      num_heads=2, rpe_config=irpe_jax.get_rpe_config(skip=1, rpe_on='qkv'))
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 3)))['params']
  mask = optim.decay_mask(params)
  assert not mask['cls_token'] and not mask['pos_embed']
  assert not mask['norm']['scale'] and not mask['head']['bias']
  attn = mask['blocks_0']['attn']
  assert not any(attn[t]['lookup_table_weight']
                 for t in ('rpe_q', 'rpe_k', 'rpe_v'))
  assert attn['qkv']['kernel'] and not attn['qkv']['bias']
  assert mask['head']['kernel'] and mask['patch_embed']['proj']['kernel']


def test_schedule_scales_with_batch_warms_up_and_decays():
  peak = optim.scaled_learning_rate(5e-4, 1024)
  assert peak == pytest.approx(1e-3)
  schedule = optim.make_schedule(peak, total_steps=100, warmup_steps=10)
  lrs = [optim.learning_rate_at(schedule, s) for s in (0, 5, 10, 50, 100)]
  assert lrs[0] == pytest.approx(1e-6, rel=1e-4)
  assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(peak, rel=1e-4)
  assert lrs[2] > lrs[3] > lrs[4] == pytest.approx(1e-5, rel=1e-4)
