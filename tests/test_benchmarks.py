"""Smoke runs of the benchmarks at tiny shapes: they run and report sanely,
and the accelerator report is written from what they measure.

Their speed targets are checked by running them (see the README), not here.
"""

import json
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import accelerator_check
from experiments.benchmarks import bench_flash
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


def test_bench_flash_quick_runs_both_parts(tmp_path):
  path = tmp_path / 'flash.json'
  assert bench_flash.main(['--quick', '--part', 'all', '--json',
                           str(path)]) == 0
  written = json.loads(path.read_text())
  entries = written['entries']
  # --quick: iRPE-QKV (q, k and v terms) and plain; DETR with iRPE. The
  # kernels run interpreted; cuDNN needs a GPU.
  assert [(e['label'], e['impl']) for e in entries] == [
      ('iRPE-QKV', 'materialized'), ('iRPE-QKV', 'blockwise'),
      ('iRPE-QKV', 'pallas'), ('plain', 'blockwise'),
      ('plain', 'dot_product'),
      ('DETR iRPE', 'materialized'), ('DETR iRPE', 'blockwise')]
  for entry in entries:
    assert entry['skipped'] is None, entry
    assert entry['temp_bytes'] > 0 and entry['compile_s'] > 0
    assert entry['median_ms'] > 0
  assert {e['length'] for e in entries if e['part'] == 'attention'} == {17}
  assert {e['length'] for e in entries if e['part'] == 'detr'} == {20}
  # Blockwise computes what the materialised path does.
  agree = [n for n in written['notes'] if 'agree' in n]
  assert len(agree) == 3  # blockwise, pallas, DETR blockwise
  assert all(float(n.split(' to ')[1].split()[0]) < 1e-4 for n in agree)


def test_bench_flash_lengths_and_skips(monkeypatch):
  assert bench_flash.grid_for(197) == (197, 14)
  assert bench_flash.grid_for(1024) == (1025, 32)
  assert bench_flash.grid_for(16384) == (16385, 128)
  for bad in (['--lengths', '1,x'], ['--attention', 'iRPE-V']):
    with pytest.raises(SystemExit):
      bench_flash.parse_args(bad)
  # Past the budget, a compiled program is not run.
  entry = bench_flash.Entry('attention', 'x', 'blockwise', 4, '1+1x1', 64)
  x = jnp.ones((256,))
  bench_flash.compile_entry(entry, lambda x: x * 2, (x,), budget=1024)
  assert entry.skipped == 'skipped: would need 0.0 GB'
  assert entry.compiled is None and entry.io_bytes == 2048
  # Materialised programs whose (B, H, L, L) arrays alone exceed it are
  # not even compiled; blockwise ones are.
  compiled = []
  monkeypatch.setattr(bench_flash, 'attention_program',
                      lambda rpe_on, impl, *args: (impl, ()))
  monkeypatch.setattr(bench_flash, 'compile_entry',
                      lambda entry, fn, *args: compiled.append(fn))
  args = bench_flash.parse_args(['--quick', '--lengths', '37',
                                 '--attention', 'iRPE-K,iRPE-QKV,plain'])
  entries, notes = bench_flash.run_attention(args, budget=2 * 37 * 37 * 4)
  # --quick on CPU takes the kernels too (interpreted).
  assert sorted(compiled) == ['blockwise'] * 3 + ['pallas'] * 2
  assert not notes
  for entry in entries:
    assert (entry.skipped is None) == (
        entry.impl in ('blockwise', 'pallas')), entry
    assert not entry.times_ms


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
      'bench_flash': {
          'shapes': {'batch': 1, 'heads': 2, 'head_dim': 8,
                     'dtype': 'bfloat16'},
          'device_kind': 'cpu', 'jax': 'x', 'revision': 'abc',
          'notes': ['L=1025 iRPE-K: pallas grads agree'],
          'entries': [{'part': 'attention', 'label': label, 'impl': impl,
                       'length': 1025, 'grid': '1+32x32',
                       'square_bytes': 2 ** 20, 'compile_s': 1.0,
                       'temp_bytes': 2 ** 16, 'io_bytes': 2 ** 10,
                       'skipped': None, 'times_ms': [ms]}
                      for label, impl, ms in (('iRPE-K', 'pallas', 11.0),
                                              ('plain', 'cudnn', 10.0))]},
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
  assert '| iRPE-K | pallas |' in text and '| 1.10 |' in text
  assert '[HOLDS] iRPE-K pallas at L=1025: 1.10x plain cuDNN' in text
  assert '- L=1025 iRPE-K: pallas grads agree' in text


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
