"""Test set-up: 4 host CPU devices (for pmap/shard_map tests) and golden data.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[1] / '..' / 'shared' / 'golden'


@pytest.fixture(scope='session')
def golden_dir() -> pathlib.Path:
  if not GOLDEN_DIR.is_dir():
    pytest.fail(f'Golden vectors not found at {GOLDEN_DIR.resolve()}; they '
                'come with the project checkout as ../shared/golden.')
  return GOLDEN_DIR
