"""Configs: the release's defaults and aliases, and clear errors."""

import dataclasses

import pytest

import irpe_jax


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
    (dict(mode='bias', rpe_on='kv'), ValueError, "mode='bias' does not exist on v"),
    (dict(ratio=0), ValueError, 'ratio must be > 0, got 0'),
    (dict(ratio=-1.5), ValueError, 'ratio must be > 0, got -1.5'),
    (dict(ratio='1.9'), TypeError, 'ratio must be a number'),
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
