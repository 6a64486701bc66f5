"""experiments.deit.evaluate: top-1/top-5 of a checkpoint, folder and tfds data.

Each run is checked against a direct computation: every image through the
eval transform and the model, one at a time, no sharding or padding.
"""

import pathlib
import shutil

import flax
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.deit import evaluate
from experiments.deit import input_pipeline
from experiments.deit import make_digits_folder
from experiments.deit import trainer
from experiments.deit import transforms
from experiments.lib import checkpoints
from irpe_jax import convert
from irpe_jax import models
import snapshots
import train_worker

GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden'
TINY_CONFIG = '''
import train_worker
def get_config():
  config = train_worker.tiny_config({dataset!r})
  config.total_steps = 2
  config.model.update({model!r})
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


def write_config(tmp_path, dataset, **model):
  path = tmp_path / f'tiny_config{len(model)}.py'
  path.write_text(TINY_CONFIG.format(dataset=dataset, model=model))
  return str(path)


def test_npz_checkpoint_on_a_folder_matches_a_direct_computation(
    tmp_path, small_folder, capsys):
  dataset = f'folder:{small_folder}'
  config = train_worker.tiny_config(dataset)
  model = trainer.build_model(config, 10)
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


@pytest.fixture(scope='module')
def run(tmp_path_factory, small_folder):
  """A 2-step run of the tiny config: best/2 and checkpoints/2."""
  dataset = f'folder:{small_folder}'
  config = train_worker.tiny_config(dataset)
  config.total_steps = 2
  workdir = tmp_path_factory.mktemp('run')
  ran = trainer.train_and_evaluate(config, str(workdir))
  return workdir, ran['eval']


def assert_eval_equal(got, want):
  assert got['top1'] == pytest.approx(want['top1'], abs=1e-9)
  assert got['top5'] == pytest.approx(want['top5'], abs=1e-9)
  assert got['loss'] == pytest.approx(want['loss'], rel=1e-5)


def test_a_training_workdir_evaluates_as_training_did(tmp_path, small_folder,
                                                      run):
  dataset = f'folder:{small_folder}'
  workdir, ran = run
  before = snapshots.snapshot(workdir)
  got = evaluate.main(['--config', write_config(tmp_path, dataset),
                       '--checkpoint', str(workdir), '--data', dataset])
  assert_eval_equal(got, ran)
  assert snapshots.snapshot(workdir) == before


def test_a_damaged_best_falls_back_to_the_newest_good_checkpoint(
    tmp_path, small_folder, run, capsys):
  dataset = f'folder:{small_folder}'
  workdir = tmp_path / 'run'
  shutil.copytree(run[0], workdir)
  snapshots.flip_a_byte(workdir / 'best' / '2')
  before = snapshots.snapshot(workdir)
  argv = ['--config', write_config(tmp_path, dataset), '--checkpoint',
          str(workdir), '--data', dataset]
  got = evaluate.main(argv)
  # checkpoints/2 holds the params that best/2 held.
  assert_eval_equal(got, run[1])
  out = capsys.readouterr().out
  assert 'Evaluating checkpoints/2 (skipped the damaged best/2:' in out
  assert 'differs from its checksum' in out
  snapshots.flip_a_byte(workdir / 'checkpoints' / '2')
  before = snapshots.snapshot(workdir)
  with pytest.raises(SystemExit, match='No checkpoint of .* restores: '
                     'best/2: .*; checkpoints/2: '):
    evaluate.main(argv)
  # Nothing moved aside, nothing created: an evaluation only reads.
  assert snapshots.snapshot(workdir) == before


def test_a_run_of_another_model_names_every_misfit(tmp_path, small_folder,
                                                   run):
  dataset = f'folder:{small_folder}'
  workdir = run[0]
  before = snapshots.snapshot(workdir)
  deeper = write_config(tmp_path, dataset, depth=2)
  with pytest.raises(SystemExit) as raised:
    evaluate.main(['--config', deeper, '--checkpoint', str(workdir),
                   '--data', dataset])
  message = str(raised.value)
  assert message.startswith(f'error: {workdir}/best/2 does not fit')
  # Every parameter of the second block is named.
  config = train_worker.tiny_config(dataset)
  config.model.depth = 2
  model = trainer.build_model(config, 10)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 16, 16, 3)), train=False))['params']
  second = ['/'.join(k) for k in flax.traverse_util.flatten_dict(params)
            if k[0] == 'blocks_1']
  assert len(second) > 5
  assert f'lacks {len(second)} the model has' in message
  assert all(name in message for name in second)
  # Other patches: the position embedding and the patch kernel differ.
  with pytest.raises(SystemExit, match='2 differ in shape .*pos_embed '
                     r'\(1, 17, 16\) vs the model\'s \(1, 65, 16\)'):
    evaluate.main(['--config', write_config(tmp_path, dataset, patch_size=2),
                   '--checkpoint', str(workdir), '--data', dataset])
  # The deeper run evaluated with the shallower config.
  deep = tmp_path / 'deep'
  ckpt = checkpoints.Checkpoints(str(deep), 1, False)
  ckpt.save_best(5, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                 params), {'top1': 0.5})
  ckpt.close()
  with pytest.raises(SystemExit, match=f'holds {len(second)} the model has '
                     'not .*blocks_1/'):
    evaluate.main(['--config', write_config(tmp_path, dataset),
                   '--checkpoint', str(deep), '--data', dataset])
  assert snapshots.snapshot(workdir) == before


def test_an_empty_folder_is_an_error_and_stays_empty(tmp_path, small_folder):
  dataset = f'folder:{small_folder}'
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(SystemExit, match='holds no checkpoint'):
    evaluate.main(['--config', write_config(tmp_path, dataset),
                   '--checkpoint', str(empty), '--data', dataset])
  assert not list(empty.iterdir())


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
       'holds no checkpoint'),
      (['--checkpoint', str(tmp_path), '--data', f'folder:{tmp_path}'],
       'pass --split')):
    with pytest.raises(SystemExit, match=message):
      evaluate.main(['--config', config] + argv)
