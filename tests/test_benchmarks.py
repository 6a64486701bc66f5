"""Smoke runs of the benchmarks at tiny shapes: they run and report sanely,
and the accelerator report is written from what they measure.

Their speed targets are checked by running them (see the README), not here.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments.benchmarks import accelerator_check
from experiments.benchmarks import bench_rpe
from experiments.benchmarks import bench_train


@pytest.fixture(scope='module')
def bench_outputs(tmp_path_factory):
  """`(bench_train results, its JSON, bench_rpe's JSON)` of tiny runs."""
  tmp = tmp_path_factory.mktemp('bench')
  train_json, rpe_json = tmp / 'train.json', tmp / 'rpe.json'
  results = bench_train.main(['--batch', '2', '--image_size', '32',
                              '--depth', '1', '--rounds', '2',
                              '--json', str(train_json)])
  # bf16 inputs, float32 tables; at these shapes no target is judged.
  assert bench_rpe.main(['--quick', '--dtype', 'bfloat16',
                         '--json', str(rpe_json)]) == 0
  return (results, json.loads(train_json.read_text()),
          json.loads(rpe_json.read_text()))


def test_bench_train_reports_every_model(bench_outputs):
  results, written, _ = bench_outputs
  assert set(results) == {label for label, _ in bench_train.MODELS}
  for label, result in results.items():
    assert result['seconds_per_step'] > 0 and result['first_step_s'] > 0
    assert len(result['all_times']) == 2
    assert np.isfinite(result['overhead']), label
  assert results['DeiT-S']['overhead_best'] == 0.0
  assert written['models'] == json.loads(json.dumps(results))
  assert written['dtype'] == 'float32' and written['batch'] == 2
  assert 'device_peak_bytes' in written  # None on CPU: no allocator stats


def test_bench_train_runs_chosen_models_without_plain():
  results = bench_train.main(['--batch', '1', '--image_size', '16',
                              '--depth', '1', '--rounds', '1',
                              '--models', 'k', '--dtype', 'bfloat16'])
  assert set(results) == {'DeiT-S + iRPE-K'}
  assert results['DeiT-S + iRPE-K']['overhead'] is None  # no plain to compare
  with pytest.raises(SystemExit):
    bench_train.parse_args(['--models', 'kv'])


def test_bench_rpe_quick_runs_every_impl_in_bf16(bench_outputs):
  _, _, written = bench_outputs
  assert written['dtype'] == 'bfloat16' and written['auto'] == 'factored'
  for impl in bench_rpe.ops.IMPLS + (bench_rpe.BASELINE,):
    for what in ('k', 'v'):
      for kind in ('fwd', 'fb'):
        entry = written['entries'][f'{what}/{impl}/{kind}']
        assert entry['median_ms'] > 0 and entry['compile_s'] > 0
  assert written['worst_relative_difference'] < 0.05  # bf16 rounding only


def test_accelerator_report_from_bench_outputs(bench_outputs, tmp_path):
  _, train, rpe = bench_outputs
  part = {'name': 'bench_rpe_bfloat16', 'status': 'ok', 'seconds': 3.0,
          'log': str(tmp_path / 'logs' / 'bench_rpe_bfloat16.log')}
  results = {
      'device': {'device_kind': 'cpu', 'platform': 'cpu', 'jax': 'x',
                 'jaxlib': 'x', 'devices': ['cpu:0'], 'bytes_limit': None,
                 'auto': 'factored'},
      'parts': [part], 'quick': True,
      'tests': {'passed': 3, 'failed': 0, 'errors': 0, 'skipped': 1},
      'bench_rpe': {'bfloat16': rpe, 'float32': None}, 'batch': 2,
      'bench_train': {(key, 'float32'): train
                      for key in bench_train.MODEL_KEYS}}
  path = tmp_path / 'report.md'
  text = accelerator_check.write_report(results, path)
  assert path.read_text() == text
  assert '| 3 | 0 | 0 | 1 |' in text
  assert "'auto' runs 'factored'" in text and 'float32: no result' in text
  rows = [l for l in text.splitlines() if l.startswith('| DeiT-S')]
  assert len(rows) == 3  # the overheads of iRPE-K and -QKV over plain:
  assert all(re.search(r'\| [+-]\d+\.\d%', row) for row in rows[1:])
  assert '| bench_rpe_bfloat16 | ok | 3 | logs/bench_rpe_bfloat16.log |' in text


def test_device_batch_fits_half_the_memory():
  assert accelerator_check.batch_for(None) == 16
  assert accelerator_check.batch_for(139 * 2**30) == 256  # H200: capped
  assert accelerator_check.batch_for(16 * 2**30) == 32
  assert accelerator_check.batch_for(2**30) == 8  # the floor


def test_runner_keeps_parts_within_their_limits(tmp_path):
  runner = accelerator_check.Runner(8.0, tmp_path / 'logs', env=None)
  ok = runner.run('ok', [sys.executable, '-c', 'print("hi")'], 30)
  slow = runner.run('slow', [sys.executable, '-c',
                             'import time; time.sleep(60)'], 6)
  late = runner.run('late', [sys.executable, '-c', 'print(1)'], 30)
  assert ok['status'] == 'ok' and 'hi' in (tmp_path / 'logs/ok.log').read_text()
  assert slow['status'].startswith('timed out') and slow['seconds'] < 15
  assert late['status'] == 'skipped: out of time'


def test_accelerator_check_script_parses_its_flags():
  script = accelerator_check.REPO / 'scripts' / 'accelerator_check.sh'
  run = lambda *a: subprocess.run(['bash', str(script), *a],
                                  capture_output=True, text=True)
  usage = run('--help')
  assert usage.returncode == 0 and '--no-install' in usage.stdout
  assert run('--bogus').returncode == 2
