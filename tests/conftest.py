"""Test set-up: 4 host CPU devices, for the pmap and shard_map tests.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def pytest_terminal_summary(terminalreporter, exitstatus):
  """Says whether the suite passed, even under `-qq` (no pytest summary)."""
  config = terminalreporter.config
  if config.get_verbosity() >= -1 or config.option.collectonly:
    return  # pytest prints its own summary line.
  counts = {key: len(terminalreporter.stats.get(key, ()))
            for key in ('passed', 'failed', 'error', 'skipped')}
  summary = ', '.join(f'{n} {key}' for key, n in counts.items() if n)
  verdict = 'PASSED' if exitstatus == 0 else 'FAILED'
  terminalreporter.write_line(f'{verdict}: {summary or "no tests ran"}')
