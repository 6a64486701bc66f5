"""experiments.evaluate: top-1/top-5 of a checkpoint on folder and tfds data.

Each run is checked against a direct computation: every image through the
eval transform and the model, one at a time, no sharding or padding.
"""

import pathlib

import flax
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import evaluate
from experiments import input_pipeline
from experiments import make_digits_folder
from experiments import train
from experiments import transforms
from irpe_jax import convert
from irpe_jax import models
import train_worker

GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden'
TINY_CONFIG = '''
import train_worker
def get_config():
  config = train_worker.tiny_config({dataset!r})
  config.total_steps = 2
  return config
'''


def direct_metrics(model, params, source, input_config):
  """top1, top5 and mean loss, one image at a time."""
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  top1 = top5 = loss = 0.0
  for i in range(len(source)):
    example = source[i]
    image = transforms.eval_transform(example['image'], input_config)
    logits = np.asarray(apply(params, image[None]))[0].astype(np.float64)
    label = int(example['label'])
    order = np.argsort(-logits)
    top1 += order[0] == label
    top5 += label in order[:5]
    loss += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - \
        logits[label]
  n = len(source)
  return {'top1': top1 / n, 'top5': top5 / n, 'loss': loss / n, 'count': n}


def assert_metrics_equal(got, want):
  assert got['count'] == want['count']
  assert got['top1'] == pytest.approx(want['top1'], abs=1e-9)
  assert got['top5'] == pytest.approx(want['top5'], abs=1e-9)
  assert got['loss'] == pytest.approx(want['loss'], rel=1e-4)


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  """The digits folder at 16px, the size of the tiny test config."""
  root = tmp_path_factory.mktemp('digits')
  counts = make_digits_folder.write_digits(str(root), size=16)
  return root, counts


def test_make_digits_folder_writes_every_digit_once(digits):
  root, counts = digits
  assert counts == {'train': 1347, 'test': 450}
  for split, count in counts.items():
    files = sorted(root.glob(f'{split}/*/*.png'))
    assert len(files) == count
    assert sorted({f.parent.name for f in files}) == [str(d) for d in range(10)]
  train_ids = {f.stem for f in root.glob('train/*/*.png')}
  assert not train_ids & {f.stem for f in root.glob('test/*/*.png')}
  image = input_pipeline.ImageFolderSource(str(root / 'test'))[0]['image']
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  assert image.max() == 255 and image.min() == 0  # ink and background.
  with pytest.raises(ValueError, match='size=12'):
    make_digits_folder.write_digits(str(root / 'x'), size=12)


@pytest.fixture(scope='module')
def small_folder(tmp_path_factory, digits):
  """10 test digits (9 per class would be slow): 1 per class, as a folder."""
  root = tmp_path_factory.mktemp('small')
  for label in range(10):
    for split in ('train', 'test'):
      target = root / split / str(label)
      target.mkdir(parents=True)
      for f in sorted((digits[0] / split / str(label)).glob('*.png'))[:1]:
        (target / f.name).write_bytes(f.read_bytes())
  return root


def write_config(tmp_path, dataset):
  path = tmp_path / 'tiny_config.py'
  path.write_text(TINY_CONFIG.format(dataset=dataset))
  return str(path)


def test_npz_checkpoint_on_a_folder_matches_a_direct_computation(
    tmp_path, small_folder, capsys):
  dataset = f'folder:{small_folder}'
  config = train_worker.tiny_config(dataset)
  model = train.build_model(config, 10)
  params = model.init(jax.random.key(3), np.zeros((1, 16, 16, 3)),
                      train=False)['params']
  np.savez(tmp_path / 'model.npz', **{
      k: np.asarray(v) for k, v in convert.flax_to_torch(params).items()})
  # 10 images on 4 devices in batches of 4: the last batch is padded.
  got = evaluate.main(['--config', write_config(tmp_path, dataset),
                       '--checkpoint', str(tmp_path / 'model.npz'),
                       '--data', dataset, '--batch_size', '4'])
  source, _ = input_pipeline.get_source(dataset, 'test')
  assert_metrics_equal(got, direct_metrics(model, params, source,
                                           config.input))
  out = capsys.readouterr().out
  assert 'on 10 images of' in out and '(test)' in out
  assert f'top-1 {100 * got["top1"]:.2f}%' in out


def test_a_training_workdir_evaluates_as_training_did(tmp_path, small_folder):
  dataset = f'folder:{small_folder}'
  config = train_worker.tiny_config(dataset)
  config.total_steps = 2
  ran = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  got = evaluate.main(['--config', write_config(tmp_path, dataset),
                       '--checkpoint', str(tmp_path / 'wd'), '--data',
                       dataset])
  assert got['top1'] == pytest.approx(ran['eval']['top1'], abs=1e-9)
  assert got['top5'] == pytest.approx(ran['eval']['top5'], abs=1e-9)
  assert got['loss'] == pytest.approx(ran['eval']['loss'], rel=1e-5)


def test_release_pth_on_mock_imagenet_with_the_release_eval_crop(
    monkeypatch, capsys):
  """--model NAME with the release's .pth: a 2-block DeiT-Ti-K."""
  create = models.create_model
  monkeypatch.setattr(evaluate.models, 'create_model',
                      lambda name: create(name, depth=2))
  name = 'deit_tiny_patch16_224_ctx_product_50_shared_k'
  pth = str(GOLDEN / 'deit_tiny_ctx_product_50_shared_k_depth2.pth')
  with tfds.testing.mock_data(num_examples=6):
    got = evaluate.main(['--model', name, '--checkpoint', pth, '--data',
                         'imagenet2012', '--batch_size', '4'])
    source, _ = input_pipeline.get_source('imagenet2012', 'validation')
    model = create(name, depth=2)
    want = direct_metrics(
        model, convert.load_torch_checkpoint(pth, model), source,
        ml_collections.ConfigDict({'image_size': 224,
                                   'crop_fraction': 0.875}))
  assert_metrics_equal(got, want)
  assert '(validation) at 224px' in capsys.readouterr().out


def test_bad_checkpoints_and_data_end_with_one_line(tmp_path, small_folder):
  dataset = f'folder:{small_folder}'
  config = write_config(tmp_path, dataset)
  for argv, message in (
      (['--checkpoint', str(tmp_path / 'nope.npz'), '--data', dataset],
       'does not exist'),
      (['--checkpoint', str(tmp_path), '--data', dataset],
       'without best/ or checkpoints/'),
      (['--checkpoint', str(tmp_path), '--data', f'folder:{tmp_path}'],
       'pass --split')):
    with pytest.raises(SystemExit, match=message):
      evaluate.main(['--config', config] + argv)
