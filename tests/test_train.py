"""experiments.train: a few tiny steps on an image folder and on mock tfds.

Proves what a user scaling up relies on: the same steps give the same
params on 1 device, on 4 devices and on two processes of 2 devices each; a
run stopped mid-way resumes from its workdir to the same params; metrics
and checkpoints land in the workdir.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from experiments import plot_metrics
from experiments import train
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
  out = train.train_and_evaluate(
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


def test_two_processes_match_one_process(four_device_run, image_folder,
                                         tmp_path):
  flat = run_workers(image_folder, tmp_path, devices=2, processes=2)
  assert flat['device_count'] == 4 and flat['process_count'] == 2
  assert_same_params(flat, four_device_run[1]['params'])
  np.testing.assert_allclose(flat['eval/top1'],
                             four_device_run[1]['eval']['top1'])


def test_stopped_run_resumes_to_the_same_params(four_device_run,
                                                 image_folder, tmp_path):
  config = train_worker.tiny_config(f'folder:{image_folder}')
  stopped = train.train_and_evaluate(config, str(tmp_path), stop_at_step=1)
  assert stopped['step'] == 1
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert resumed['step'] == 4
  assert_same_params(train_worker.flat_params(resumed['params']),
                     four_device_run[1]['params'], rtol=1e-6, atol=1e-7)
  # And the stopped run really was part-way: its params differ.
  moved = train_worker.flat_params(stopped['params'])
  final = train_worker.flat_params(resumed['params'])
  assert any(not np.allclose(moved[k], final[k]) for k in final)


def test_trains_on_a_tfds_dataset(tmp_path):
  config = train_worker.tiny_config('cifar10')
  config.total_steps = 2
  with tfds.testing.mock_data(num_examples=16):
    out = train.train_and_evaluate(config, str(tmp_path))
  assert out['step'] == 2
  assert 0.0 <= out['eval']['top1'] <= 1.0
  assert np.isfinite(out['eval']['loss'])


@pytest.mark.parametrize('progress_bar', [True, False])
def test_metric_writer_shows_progress_rate_and_eta(tmp_path, capsys,
                                                   progress_bar):
  writer = train.MetricWriter(str(tmp_path), total_steps=8, start_step=2,
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
