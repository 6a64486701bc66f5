"""experiments.deit.train: a few tiny steps on an image folder.

The tfds path is in test_input_pipeline.

Proves what a user scaling up relies on: the same steps give the same
params on 1 device, on 4 devices and on two processes of 2 devices each; a
run stopped or killed mid-way resumes from its workdir to the same params,
falling back past a damaged checkpoint; a non-finite loss never reaches a
checkpoint; metrics and checkpoints land in the workdir, one row per step.

The in-process runs share one config, so they share its compiled steps
(`trainer.compiled_steps`): each costs seconds, not a compile.
"""

import glob
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from experiments.deit import input_pipeline
from experiments.deit import trainer
from experiments.lib import checkpoints
from experiments.lib import cli
from experiments.lib import metrics
from experiments.lib import plot_metrics
import snapshots
import train_worker

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).resolve().parent / 'train_worker.py'


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> pathlib.Path:
  """3 classes of 16x16 to 24x20 PNGs: 24 train and 9 test images."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  for split, count in (('train', 8), ('test', 3)):
    for label in range(3):
      folder = root / split / f'class_{label}'
      folder.mkdir(parents=True)
      for i in range(count):
        shape = (16 + 4 * (i % 3), 20, 3)
        image = rng.integers(0, 255, shape).astype(np.uint8)
        image[..., label] = 255  # a learnable colour cue.
        Image.fromarray(image).save(folder / f'{i}.png')
  return root


def run_workers(folder, tmp_path, devices, processes=1):
  """Runs the worker(s); returns the npz of process 0."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop('XLA_FLAGS', None)
  commands = []
  base = [sys.executable, str(WORKER), '--folder', str(folder),
          '--workdir', str(tmp_path / f'wd_{devices}x{processes}'),
          '--devices', str(devices)]
  if processes == 1:
    commands.append(base + ['--out', str(tmp_path / 'out_0.npz')])
  else:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      port = s.getsockname()[1]
    for i in range(processes):
      commands.append(base + [
          '--out', str(tmp_path / f'out_{i}.npz'),
          '--coordinator', f'localhost:{port}',
          '--num_processes', str(processes), '--process_id', str(i)])
  logs = [open(tmp_path / f'log_{i}.txt', 'w+') for i in range(len(commands))]
  # Output to files, not pipes: a full pipe would stall one process and,
  # at the next collective, the other.
  procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
           for c, log in zip(commands, logs)]
  for proc, log in zip(procs, logs):
    try:
      proc.wait(timeout=240)
    finally:
      if proc.poll() is None:
        proc.kill()
    log.seek(0)
    assert proc.returncode == 0, log.read()[-3000:]
    log.close()
  with np.load(tmp_path / 'out_0.npz') as out:
    return dict(out)


@pytest.fixture(scope='module')
def four_device_run(image_folder, tmp_path_factory):
  """Runs in this process: conftest gives it 4 CPU devices."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4
  workdir = tmp_path_factory.mktemp('wd4')
  out = trainer.train_and_evaluate(
      train_worker.tiny_config(f'folder:{image_folder}'), str(workdir))
  return workdir, out


def assert_same_params(flat, params, rtol=2e-5, atol=2e-6):
  expected = train_worker.flat_params(params)
  assert set(expected) <= set(flat)
  for name, value in expected.items():
    np.testing.assert_allclose(flat[name], value, rtol=rtol, atol=atol,
                               err_msg=name)


def test_run_writes_metrics_checkpoints_and_moves_params(four_device_run):
  workdir, out = four_device_run
  assert out['step'] == 4
  assert 0.0 <= out['eval']['top1'] <= out['eval']['top5'] <= 1.0
  assert np.isfinite(out['eval']['loss'])
  records = [json.loads(line) for line in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == [1, 2, 3, 4]
  assert all(np.isfinite(r['train/loss']) and r['train/lr'] > 0
             for r in records if 'train/loss' in r)
  assert [r['step'] for r in records if 'eval/top1' in r] == [2, 4]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert len(os.listdir(workdir / 'best')) == 1
  assert os.listdir(workdir / 'tb')
  # The iRPE tables start at zero and must have been trained.
  table = out['params']['blocks_0']['attn']['rpe_k']['lookup_table_weight']
  assert np.abs(table).max() > 0
  plot_metrics.main([str(workdir), '--out', str(workdir / 'curves.png')])
  with Image.open(workdir / 'curves.png') as image:
    assert image.size[0] > 200


def test_one_device_matches_four_devices(four_device_run, image_folder,
                                         tmp_path):
  flat = run_workers(image_folder, tmp_path, devices=1)
  assert flat['device_count'] == 1
  assert_same_params(flat, four_device_run[1]['params'])


def test_two_processes_resume_a_damaged_run_to_the_same_params(
    four_device_run, stopped_at_3, image_folder, tmp_path):
  """Two processes of 2 devices take over a one-process run of 4 devices
  whose last checkpoint is damaged: both fall back to step 2, it is set
  aside once, and they end where the uninterrupted run did."""
  workdir = tmp_path / 'wd_2x2'
  shutil.copytree(stopped_at_3, workdir)
  flip_32_bytes(workdir / 'checkpoints' / '3')
  flat = run_workers(image_folder, tmp_path, devices=2, processes=2)
  assert flat['device_count'] == 4 and flat['process_count'] == 2
  assert_same_params(flat, four_device_run[1]['params'])
  np.testing.assert_allclose(flat['eval/top1'],
                             four_device_run[1]['eval']['top1'])
  for i in range(2):
    assert 'Skipping checkpoint 3' in (tmp_path / f'log_{i}.txt').read_text()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert len(os.listdir(workdir / 'rejected_checkpoints')) == 2  # + reason.
  assert rows_by_step(workdir) == {'train': [1, 2, 3, 4], 'eval': [2, 4]}


def test_stopped_run_resumes_to_the_same_params(four_device_run,
                                                 image_folder, tmp_path):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  stopped = trainer.train_and_evaluate(config, str(tmp_path), stop_at_step=1)
  assert stopped['step'] == 1
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  resumed = trainer.train_and_evaluate(config, str(tmp_path))
  assert resumed['step'] == 4
  assert_same_params(train_worker.flat_params(resumed['params']),
                     four_device_run[1]['params'], rtol=1e-6, atol=1e-7)
  # And the stopped run really was part-way: its params differ.
  moved = train_worker.flat_params(stopped['params'])
  final = train_worker.flat_params(resumed['params'])
  assert any(not np.allclose(moved[k], final[k]) for k in final)


@pytest.mark.parametrize('progress_bar', [True, False])
def test_metric_writer_shows_progress_rate_and_eta(tmp_path, capsys,
                                                   progress_bar):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=8, start_step=2,
                              progress_bar=progress_bar)
  writer.advance(4)
  writer.write(4, {'loss': 0.5, 'steps_per_sec': 2.0}, 'train')
  writer.close()
  out, err = capsys.readouterr()
  assert '[      4/8  50.0%] train: loss=0.5' in out
  assert 'eta=00:00:02' in out  # 4 steps left at 2 steps/s.
  if progress_bar:
    assert '4/8' in err and 'step/s' in err  # tqdm: count and rate.
  else:
    assert err == ''
  record = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])
  assert record == {'step': 4, 'train/loss': 0.5, 'train/steps_per_sec': 2.0}


def test_drop_rows_after_keeps_each_step_once(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "eval/top1": '
                  '0.5}\n{"step": 3, "train/loss": 1.0}\n{"step": 4, "tr')
  assert metrics.drop_rows_after(str(path), 2) == 2  # step 3, the cut line.
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [
      1, 2]
  assert metrics.drop_rows_after(str(path), 2) == 0
  assert metrics.drop_rows_after(str(tmp_path / 'none.jsonl'), 0) == 0


# --- Resume: kills, damaged checkpoints, non-finite losses --------------------


def rows_by_step(workdir):
  """`{prefix: [steps]}` of a workdir's metrics.jsonl, in file order."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text(
      ).splitlines():
    record = json.loads(line)
    prefix = next(k for k in record if k != 'step').split('/')[0]
    out.setdefault(prefix, []).append(record['step'])
  return out


def interrupted_iterator(monkeypatch, at_step=None, nan_steps=()):
  """Makes the train iterator die before step `at_step` (a kill) or hand
  out all-NaN images at `nan_steps`."""
  real = input_pipeline.train_iterator

  def iterator(source, config, start_step, num_steps, seed):
    batches = real(source, config, start_step, num_steps, seed)
    for step, batch in zip(range(start_step + 1, num_steps + 1), batches):
      if step == at_step:
        raise KeyboardInterrupt(f'killed before step {step}')
      if step in nan_steps:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_iterator', iterator)


def test_killed_run_resumes_exactly_and_logs_each_step_once(
    four_device_run, image_folder, tmp_path, monkeypatch):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  with monkeypatch.context() as patch:
    interrupted_iterator(patch, at_step=4)
    with pytest.raises(KeyboardInterrupt):
      trainer.train_and_evaluate(config, str(tmp_path))
  # Step 3 was logged, but the last checkpoint is step 2: it is replayed.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  assert rows_by_step(tmp_path)['train'] == [1, 2, 3]
  resumed = trainer.train_and_evaluate(config, str(tmp_path))
  assert rows_by_step(tmp_path) == {'train': [1, 2, 3, 4], 'eval': [2, 4]}
  assert_same_params(train_worker.flat_params(resumed['params']),
                     four_device_run[1]['params'], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope='module')
def stopped_at_3(image_folder, tmp_path_factory):
  """A run stopped at step 3: checkpoints 2 and 3, metrics up to 3."""
  workdir = tmp_path_factory.mktemp('stopped_at_3')
  trainer.train_and_evaluate(train_worker.tiny_config(f'folder:{image_folder}'),
                           str(workdir), stop_at_step=3)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3']
  return workdir


def largest_file(folder):
  files = [f for f in glob.glob(f'{folder}/**', recursive=True)
           if os.path.isfile(f) and checkpoints.CHECKSUMS not in f]
  return max(files, key=os.path.getsize)


def flip_32_bytes(step_dir):
  path = largest_file(step_dir)
  data = bytearray(pathlib.Path(path).read_bytes())
  middle = len(data) // 2
  data[middle:middle + 32] = bytes(b ^ 0xFF for b in data[middle:middle + 32])
  pathlib.Path(path).write_bytes(bytes(data))


def truncate(step_dir):
  path = largest_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def remove_metadata(step_dir):
  os.remove(step_dir / 'state' / '_METADATA')


def garble_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').write_text('{"tree_metadata": {"par')


def empty_folder(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def garble_metadata_without_sums(step_dir):
  """Damage without sums to see it: the restore itself must fail."""
  os.remove(step_dir / checkpoints.CHECKSUMS)
  garble_metadata(step_dir)


def nan_with_valid_sums(step_dir):
  """A NaN state that checks out, as a run without the guard saved one."""
  manager = ocp.CheckpointManager(step_dir.parent)
  step = int(step_dir.name)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  state = dict(restored.state)
  state['params'] = jax.tree.map(lambda x: x * np.nan, state['params'])
  manager.delete(step)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(restored.data)), force=True)
  manager.wait_until_finished()
  manager.close()
  checkpoints.write_checksums(str(step_dir))


DAMAGE = {'flipped_32_bytes': (flip_32_bytes, 'differs from its checksum'),
          'truncated_file': (truncate, 'differs from its checksum'),
          'missing_METADATA': (remove_metadata, '_METADATA is missing'),
          'garbled_metadata': (garble_metadata, 'differs from its checksum'),
          'empty_step_folder': (empty_folder, 'the step folder is empty'),
          'garbled_metadata_without_sums': (garble_metadata_without_sums,
                                            'orbax cannot restore it'),
          'nan_with_valid_sums': (nan_with_valid_sums, 'non-finite values')}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    damage, stopped_at_3, four_device_run, image_folder, tmp_path, caplog):
  workdir = tmp_path / 'wd'
  shutil.copytree(stopped_at_3, workdir)
  damage_fn, reason = DAMAGE[damage]
  damage_fn(workdir / 'checkpoints' / '3')
  with caplog.at_level(logging.WARNING):
    out = trainer.train_and_evaluate(
        train_worker.tiny_config(f'folder:{image_folder}'), str(workdir))
  skipped = [r.getMessage() for r in caplog.records
             if 'Skipping checkpoint 3' in r.getMessage()]
  assert skipped and reason in skipped[0], caplog.text
  assert 'Resumed from checkpoint 2' in caplog.text
  # Resumed from step 2 exactly; the damaged step is kept aside, not reused.
  assert out['step'] == 4
  assert_same_params(train_worker.flat_params(out['params']),
                     four_device_run[1]['params'], rtol=1e-6, atol=1e-7)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  rejected = os.listdir(workdir / 'rejected_checkpoints')
  assert any(name.startswith('3-') and not name.endswith('.txt')
             for name in rejected)
  assert rows_by_step(workdir) == {'train': [1, 2, 3, 4], 'eval': [2, 4]}


def test_no_checkpoint_restores_stops_with_every_reason(
    stopped_at_3, image_folder, tmp_path):
  workdir = tmp_path / 'wd'
  shutil.copytree(stopped_at_3, workdir)
  flip_32_bytes(workdir / 'checkpoints' / '3')
  empty_folder(workdir / 'checkpoints' / '2')
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=r'No checkpoint .* restores: step 3: .*differs.*; '
                     r'step 2: the step folder is empty.*Move the folder away'):
    trainer.train_and_evaluate(
        train_worker.tiny_config(f'folder:{image_folder}'), str(workdir))
  # Nothing was moved or overwritten: the user decides.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3']
  assert not (workdir / 'rejected_checkpoints').exists()


def test_resuming_with_another_models_config_names_it_and_keeps_the_run(
    stopped_at_3, image_folder):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  config.model.depth = 2
  before = snapshots.snapshot(stopped_at_3)
  with pytest.raises(ValueError, match='Checkpoint 3 of .* holds another model '
                     'than the config: it lacks 14 the model has '
                     r'\(blocks_1/.*Resume with the config of the run'):
    trainer.train_and_evaluate(config, str(stopped_at_3))
  # Not taken for damage: nothing set aside, nothing written.
  assert snapshots.snapshot(stopped_at_3) == before


def test_saved_checkpoints_carry_sums_that_verify(stopped_at_3):
  for step in ('2', '3'):
    assert checkpoints.verify_checksums(
        str(stopped_at_3 / 'checkpoints' / step))
  (best,) = os.listdir(stopped_at_3 / 'best')
  assert checkpoints.verify_checksums(str(stopped_at_3 / 'best' / best))


def test_nonfinite_loss_stops_the_run_before_anything_is_saved(
    image_folder, tmp_path, monkeypatch):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  assert config.nonfinite_policy == 'stop'
  interrupted_iterator(monkeypatch, nan_steps=(3,))
  with pytest.raises(FloatingPointError, match=r'Non-finite loss or gradients '
                     r'in step 3\. .*the last checkpoint is step 2'):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  assert os.listdir(tmp_path / 'best') == ['2']


def test_nonfinite_loss_skip_policy_skips_the_update_and_counts_it(
    image_folder, tmp_path, monkeypatch):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  before = trainer.train_and_evaluate(config, str(tmp_path / 'clean'),
                                    stop_at_step=2)
  config.nonfinite_policy = 'skip'
  interrupted_iterator(monkeypatch, nan_steps=(3,))
  skipped = trainer.train_and_evaluate(config, str(tmp_path / 'wd'),
                                     stop_at_step=3)
  # Step 3 changed nothing: its params are step 2's, bit for bit.
  assert_same_params(train_worker.flat_params(skipped['params']),
                     before['params'], rtol=0, atol=0)
  out = trainer.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert out['step'] == 4 and np.isfinite(out['eval']['loss'])
  records = [json.loads(line) for line in
             (tmp_path / 'wd' / 'metrics.jsonl').read_text().splitlines()]
  counts = {r['step']: r['train/nonfinite_steps'] for r in records
            if 'train/loss' in r}
  assert counts == {1: 0, 2: 0, 3: 1, 4: 1}
  assert np.isnan([r['train/loss'] for r in records
                   if r['step'] == 3 and 'train/loss' in r][0])
  assert not checkpoints.nonfinite_leaves(out['params'])


def test_unwritable_workdir_fails_before_reading_data(tmp_path, monkeypatch,
                                                       image_folder):
  monkeypatch.setattr(input_pipeline, 'get_source', lambda *args: pytest.fail(
      'read the data before checking the workdir'))
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(checkpoints.UnwritableWorkdirError,
                     match='is not writable'):
    trainer.train_and_evaluate(
        train_worker.tiny_config(f'folder:{image_folder}'),
        str(blocker / 'workdir'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes anywhere')
def test_read_only_workdir_fails_before_reading_data(tmp_path, monkeypatch,
                                                      image_folder):
  monkeypatch.setattr(input_pipeline, 'get_source', lambda *args: pytest.fail(
      'read the data before checking the workdir'))
  tmp_path.chmod(0o555)
  try:
    with pytest.raises(checkpoints.UnwritableWorkdirError,
                     match='is not writable'):
      trainer.train_and_evaluate(
          train_worker.tiny_config(f'folder:{image_folder}'), str(tmp_path))
  finally:
    tmp_path.chmod(0o755)


def test_config_rejects_an_unknown_nonfinite_policy(tmp_path, image_folder):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  config.nonfinite_policy = 'ignore'
  with pytest.raises(ValueError, match="nonfinite_policy='ignore'"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_checkpoints_refuse_nonfinite_states_and_best_models(tmp_path):
  store = checkpoints.Checkpoints(str(tmp_path), keep=1, async_save=False)
  good = {'step': np.int32(1), 'params': {'w': np.ones(3, np.float32)}}
  store.save(1, good)
  bad = {'step': np.int32(2), 'params': {'w': np.array([1, np.inf, 0],
                                                       np.float32)}}
  with pytest.raises(FloatingPointError, match='Refusing to save step 2: '
                     'non-finite values in params/w'):
    store.save(2, bad)
  assert not store.save_best(2, bad['params'], {'top1': 0.9})
  assert not store.save_best(1, good['params'], {'top1': float('nan')})
  store.close()
  # keep=1, yet the finite step 1 was not pushed out.
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  assert os.listdir(tmp_path / 'best') == []


def test_init_from_a_nonfinite_model_is_refused(tmp_path, image_folder):
  from irpe_jax import convert  # pylint: disable=g-import-not-at-top
  config = train_worker.tiny_config(f'folder:{image_folder}')
  model = trainer.build_model(config, 3)
  params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)),
                      train=False)['params']
  params = jax.tree.map(np.array, params)  # writable copies.
  params['blocks_0']['norm1']['scale'][0] = np.nan
  convert.save_params(str(tmp_path / 'nan.msgpack'), params)
  config.init_from = str(tmp_path / 'nan.msgpack')
  with pytest.raises(ValueError, match=r'non-finite values in '
                     r"\['blocks_0/norm1/scale'\]"):
    trainer.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_async_checkpoints_get_their_sums_and_resume(four_device_run,
                                                     image_folder, tmp_path):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  config.async_checkpoints = True
  trainer.train_and_evaluate(config, str(tmp_path), stop_at_step=3)
  for step in ('2', '3'):
    assert checkpoints.verify_checksums(str(tmp_path / 'checkpoints' / step))
  out = trainer.train_and_evaluate(config, str(tmp_path))
  assert checkpoints.verify_checksums(str(tmp_path / 'checkpoints' / '4'))
  assert_same_params(train_worker.flat_params(out['params']),
                     four_device_run[1]['params'], rtol=1e-6, atol=1e-7)


# --- The command line: config keys in --help, one line per log record. -----


def shipped_configs():
  """Every shipped config, with each argument a config file documents."""
  from experiments.deit.configs import (  # pylint: disable=g-import-not-at-top
      cifar10_tiny, cifar_finetune, deit_ablation, deit_imagenet,
      digits_folder)
  yield cifar10_tiny.get_config()
  yield digits_folder.get_config()
  yield cifar_finetune.get_config('cifar10')
  yield deit_ablation.get_config('index=clip,abs=0,shared=0')
  for size in ('tiny', 'small', 'base'):
    for rpe_on in ('none', 'k', 'qkv'):
      yield deit_imagenet.get_config(f'{size}_{rpe_on}')


def test_every_key_of_every_shipped_config_is_described():
  from experiments.deit.configs import common  # pylint: disable=g-import-not-at-top
  for config in shipped_configs():
    for key, _ in common.flat_items(config):
      assert common.DESCRIPTIONS.get(key), key


def test_help_lists_every_config_key_with_its_value_and_meaning():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.deit.train', '--help', '--config',
       'experiments/deit/configs/digits_folder.py'], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False)
  text = out.stdout + out.stderr
  assert '--log_level' in text
  assert 'values of experiments/deit/configs/digits_folder.py' in text
  assert "input.flip = False" in text and 'random horizontal flip' in text
  assert 'optim.reference_batch = 64' in text


def test_a_run_prints_one_line_per_metric_and_no_library_chatter(
    image_folder, tmp_path, capfd):
  root = logging.getLogger()
  saved = root.handlers[:], root.level
  try:
    cli.configure_logging('info')
    config = train_worker.tiny_config(f'folder:{image_folder}')
    config.progress_bar = True
    trainer.train_and_evaluate(config, str(tmp_path))
  finally:
    logging.captureWarnings(False)
    for handler in root.handlers[:]:
      root.removeHandler(handler)
    for handler in saved[0]:
      root.addHandler(handler)
    root.setLevel(saved[1])
  out, err = capfd.readouterr()
  # tiny_config: 4 steps, a train line each, an eval line every 2 steps.
  metric_lines = [l for l in out.splitlines() if '] train: ' in l
                  or '] eval: ' in l]
  assert len(metric_lines) == 6
  # stderr: the bar (carriage returns) and this program's own INFO lines.
  log_lines = [l.split('\r')[-1] for l in err.split('\n') if l.strip()]
  own = [l for l in log_lines if ' INFO ' in l]
  # Its own lines: the data and step summary and the start step (a fresh
  # run restores nothing); no line twice.
  assert any(' train / ' in l and ' eval examples' in l for l in own), own
  assert any('Starting at step 0 of 4.' in l for l in own), own
  assert len(own) == len(set(own)) <= 4, own
  assert not [l for l in log_lines if 'orbax' in l.lower()
              or 'checkpoint_manager' in l or 'xla_bridge' in l]
  assert len(log_lines) <= len(own) + 2, log_lines  # + the bar's lines.


def test_log_level_is_checked():
  with pytest.raises(ValueError, match="'loud'"):
    cli.configure_logging('loud')
