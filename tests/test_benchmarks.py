"""Smoke runs of the benchmarks at tiny shapes: they run and report sanely.

Their speed targets are checked by running them (see the README), not here.
"""

import numpy as np

from experiments import bench_rpe
from experiments import bench_train


def test_bench_train_reports_every_model():
  results = bench_train.main(['--batch', '2', '--image_size', '32',
                              '--depth', '1', '--rounds', '2'])
  assert set(results) == {label for label, _ in bench_train.MODELS}
  for label, result in results.items():
    assert result['seconds_per_step'] > 0 and result['first_step_s'] > 0
    assert len(result['all_times']) == 2
    assert np.isfinite(result['overhead']), label
  assert results['DeiT-S']['overhead_best'] == 0.0


def test_bench_rpe_quick_runs_every_impl():
  assert bench_rpe.main(['--quick']) == 0
