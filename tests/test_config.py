"""Configs: the release's defaults and aliases, and clear errors."""

import dataclasses
import math

import numpy as np
import pytest

import irpe_jax
from irpe_jax import config as config_lib


def test_default_is_the_papers_product_contextual_on_k():
  cfg = irpe_jax.get_rpe_config(skip=1)
  assert cfg.rpe_q is None and cfg.rpe_v is None
  k = cfg.rpe_k
  assert (k.mode, k.method, k.shared_head) == ('contextual', 'product', True)
  assert (k.alpha, k.beta, k.gamma) == (1.9, 3.8, 15.2)
  assert k.num_buckets == 50  # the paper's "50 buckets"


@pytest.mark.parametrize('method,ratio,skip,num_buckets', [
    ('euc', 20, 1, 81 + 1), ('quant', 33, 1, 133 + 1), ('cross', 20, 1, 82),
    ('product', 1.9, 0, 49), ('product', 2.0, 0, 81),
])
def test_num_buckets(method, ratio, skip, num_buckets):
  cfg = irpe_jax.get_single_rpe_config(ratio=ratio, method=method, skip=skip)
  assert cfg.num_buckets == num_buckets


def test_aliases_and_release_method_ids():
  a = irpe_jax.get_rpe_config(method='euclidean', mode='ctx', rpe_on='qkv')
  b = irpe_jax.get_rpe_config(method=0, mode='contextual', rpe_on='qkv')
  assert a == b and a.rpe_q == a.rpe_v
  assert irpe_jax.get_single_rpe_config(method='quantization').method == 'quant'


def test_configs_are_frozen_and_hashable():
  cfg = irpe_jax.get_rpe_config()
  hash(cfg)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.rpe_k = None


def test_detr_string():
  cfg = irpe_jax.parse_rpe_string('rpe-2.0-product-ctx-1-k')
  assert cfg.rpe_k.num_buckets == 81 and cfg.rpe_k.skip == 0
  assert cfg.rpe_q is None


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(method='polar'), ValueError, "Unknown method 'polar'"),
    (dict(mode='absolute'), ValueError, "Unknown mode 'absolute'"),
    (dict(mode='bias', rpe_on='kv'), ValueError,
     "mode='bias' does not exist on v"),
    (dict(ratio=0), ValueError, 'ratio must be > 0, got 0'),
    (dict(ratio=-1.5), ValueError, 'ratio must be > 0, got -1.5'),
    (dict(ratio='1.9'), TypeError, 'ratio must be a real number'),
    (dict(ratio=math.inf), ValueError, 'ratio must be finite, got inf'),
    (dict(ratio=math.nan), ValueError, 'ratio must be finite, got nan'),
    # 1e7 overflowed; 1e4 asked for 1.6e9 buckets (24 GiB at D = 4).
    (dict(ratio=1e7), ValueError,
     'ratio=1e\\+07 gives product tables of .* more than MAX_BUCKETS=262144; '
     "ratio must be < 128 for method 'product'"),
    (dict(ratio=1e4), ValueError, 'ratio must be < 128'),
    (dict(ratio=128), ValueError, 'ratio must be < 128'),
    (dict(ratio=65536, method='euc'), ValueError,
     "ratio must be < 65536 for method 'euc'"),
    (dict(skip=1.0), TypeError, 'skip must be an int'),
    (dict(skip=-1), ValueError, 'skip must be >= 0, got -1'),
    (dict(rpe_on='x'), ValueError, "rpe_on must be .* got 'x'"),
    (dict(rpe_on=''), ValueError, 'rpe_on must be'),
    (dict(method='cross_rows'), ValueError, "configure method='cross'"),
    (dict(index_fn='tanh'), ValueError, "index_fn must be"),
])
def test_bad_config_raises(kwargs, error, match):
  with pytest.raises(error, match=match):
    irpe_jax.get_rpe_config(**kwargs)


@pytest.mark.parametrize('spec', ['rpe-x-product-ctx-1-k', 'rpe-2.0-product',
                                  'rpe-2.0-product-ctx-2-k'])
def test_bad_detr_string_raises(spec):
  with pytest.raises(ValueError, match='spec|RATIO|SHARED'):
    irpe_jax.parse_rpe_string(spec)


def test_numpy_scalars_are_numbers():
  cfg = irpe_jax.get_rpe_config(ratio=np.float32(1.9), skip=np.int64(1),
                                method=np.int32(3))
  assert cfg == irpe_jax.get_rpe_config(ratio=float(np.float32(1.9)), skip=1)
  assert cfg.rpe_k.num_buckets == 50
  assert isinstance(cfg.rpe_k.skip, int) and isinstance(cfg.rpe_k.alpha, float)


def test_largest_ratios_stay_within_max_buckets():
  for method, ratio in (('product', 127.99), ('euc', 65535.9),
                        ('cross', 65535.9)):
    cfg = irpe_jax.get_single_rpe_config(ratio=ratio, method=method, skip=1)
    assert cfg.num_buckets <= config_lib.MAX_BUCKETS


def test_piecewise_params_are_the_releases():
  assert config_lib.piecewise_params(1.9) == (1.9, 3.8, 15.2)
  assert config_lib.piecewise_params(np.float64(20)) == (20.0, 40.0, 160.0)
  with pytest.raises(ValueError, match='ratio must be > 0'):
    config_lib.piecewise_params(0)


def test_method_ratios_give_the_release_bucket_counts():
  # The release's DeiT models: euc 20 and cross 20 -> 81 + 1, quant 33 ->
  # 133 + 1, product 1.9 -> 49 + 1 buckets per table.
  counts = {m: irpe_jax.get_single_rpe_config(ratio=r, method=m,
                                              skip=1).num_buckets
            for m, r in config_lib.METHOD_RATIOS.items()}
  assert counts == {'euc': 82, 'quant': 134, 'cross': 82, 'product': 50}
