"""The token grid of an input: its skip tokens, and a limit on its size."""

import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import buckets
from irpe_jax import core
from irpe_jax import models
from irpe_jax.models import vit
from irpe_jax import ops

CFG_K = irpe_jax.get_rpe_config(skip=1, rpe_on='k')
RATIO = (1.9, 3.8, 15.2)
TOO_BIG = 'over the limit of'


def _eval_module(module, shape, **kwargs):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(
      lambda x: module.init(jax.random.key(0), x, **kwargs), x)


# --- L = skip + height * width for the configured skip.


@pytest.mark.parametrize('skip', [0, 1, 2, 3])
def test_explicit_grid_must_leave_exactly_the_configured_skip(skip):
  height, width = 3, 4
  length = skip + height * width
  assert core.resolve_grid(length, height, width, skip) == (height, width,
                                                            skip)
  for wrong in (length - 1, length + 1, length + 5):
    if wrong < height * width:
      continue  # The 'fewer than height*width' message, tested elsewhere.
    with pytest.raises(ValueError) as info:
      core.resolve_grid(wrong, height, width, skip)
    message = str(info.value)
    assert f'L={wrong} tokens' in message
    assert f'height={height}, width={width}' in message
    assert f'configured skip={skip}' in message
    assert f'L = skip + height*width = {length}' in message


def test_without_a_configured_skip_the_release_rule_holds():
  assert core.resolve_grid(17, 3, 4) == (3, 4, 5)
  assert core.resolve_grid(17, None, None) == (4, 4, 1)


def test_attention_with_five_leading_tokens_on_a_3x4_grid_raises():
  # skip=1, 17 tokens, 3x4: it used to run with 5 "skip" tokens.
  module = irpe_jax.IRPEAttention(num_heads=2, rpe_config=CFG_K)
  with pytest.raises(ValueError, match='L=17 tokens, but height=3, width=4 '
                     'and the configured skip=1 need L = skip'):
    _eval_module(module, (2, 17, 16), height=3, width=4)
  _eval_module(module, (2, 13, 16), height=3, width=4)


TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
            num_classes=5)
IMAGES = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))


def test_released_configs_are_used_as_they_are():
  # skip=1 and one class token: the config itself, so the golden models
  # (tests/test_parity.py) see no change at all.
  for name in models.PRETRAINED:
    model = models.create_model(name)
    assert vit.rpe_config_for_prefix(
        model.rpe_config, model.num_prefix_tokens) is model.rpe_config


def test_distilled_model_uses_its_two_prefix_tokens_as_skip():
  # A skip=1 config on DeiT-D: both prefix tokens share the skip bucket, as
  # in the release, and exactly as a skip=2 config does.
  cfg = irpe_jax.get_rpe_config(skip=1, rpe_on='qkv')
  derived = vit.rpe_config_for_prefix(cfg, 2)
  assert {derived.rpe_q.skip, derived.rpe_k.skip, derived.rpe_v.skip} == {2}
  assert derived.rpe_k.num_buckets == cfg.rpe_k.num_buckets == 50
  model = models.VisionTransformer(**TINY, rpe_config=cfg, distilled=True)
  twin = model.clone(rpe_config=irpe_jax.get_rpe_config(skip=2,
                                                        rpe_on='qkv'))
  params = jax.jit(model.init)(jax.random.key(1), IMAGES)['params']
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(len(path)), x.shape)
                       if 'lookup_table' in str(path[-1]) else x), params)
  np.testing.assert_array_equal(model.apply({'params': params}, IMAGES),
                                twin.apply({'params': params}, IMAGES))


@pytest.mark.parametrize('distilled,prefix', [(False, 1), (True, 2)])
def test_a_skip0_config_on_a_vit_names_both_skips(distilled, prefix):
  cfg = irpe_jax.get_rpe_config(skip=0, rpe_on='k')
  model = models.VisionTransformer(**TINY, rpe_config=cfg,
                                   distilled=distilled)
  with pytest.raises(ValueError, match=f'rpe_config skip=0 \\(rpe_k\\) but '
                     f'the model has num_prefix_tokens={prefix}.* '
                     f'skip={prefix}'):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)


# --- Grids too large for their (L, L) ids.


def test_a_200x200_grid_is_refused_fast_and_without_allocating():
  module = irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k)
  tracemalloc.start()
  start = time.perf_counter()
  try:
    with pytest.raises(ValueError) as info:
      _eval_module(module, (1, 1, 1 + 200 * 200, 4), height=200, width=200)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  message = str(info.value)
  # It used to take 24 s and 6.5 GB to build the ids, then 12 GB to trace.
  assert seconds < 5, seconds
  assert peak < 32 * 2 ** 20, peak
  for part in ('(L, L) bucket ids', 'height=200 x width=200', 'skip=1',
               'L=40001 tokens', '(40001, 40001)', '6400320004 bytes',
               f'limit of {2 ** 31} bytes', 'IRPE_JAX_MAX_IDS_BYTES',
               'irpe_jax.buckets.MAX_IDS_BYTES'):
    assert part in message, (part, message)


def test_a_large_geometry_is_cheap_until_its_ids_are_asked_for():
  tracemalloc.start()
  try:
    g = buckets.get_bucket_geometry('product', 200, 200, 1, *RATIO)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 8 * 2 ** 20, peak
  assert g.length == 40001 and g.pair_buckets.shape == (7, 7)
  with pytest.raises(ValueError, match=TOO_BIG):
    g.ids  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match=TOO_BIG):
    irpe_jax.get_bucket_ids_2d('product', 200, 200, 1, *RATIO)


@pytest.mark.parametrize('height,width,skip', [
    (128, 128, 0), (128, 128, 1), (128, 128, 2), (152, 152, 1), (1, 23170, 0),
])
def test_grids_within_the_default_limit_pass_the_check(height, width, skip):
  # The arithmetic only: building 1-2 GiB of ids is not for a unit test.
  length = skip + height * width
  assert buckets.check_grid_bytes('ids', (length, length), height, width,
                                  skip) == 4 * length ** 2


def test_the_default_limit_is_2_gib_inclusive():
  assert buckets.max_ids_bytes() == buckets.MAX_IDS_BYTES == 2 ** 31
  assert buckets.check_grid_bytes('ids', (2 ** 15, 2 ** 14), 1, 2 ** 15,
                                  0) == 2 ** 31
  with pytest.raises(ValueError, match='8589934592 bytes'):
    buckets.check_grid_bytes('ids', (2 ** 15, 2 ** 16), 1, 2 ** 15, 0)
  for length, fits in ((23170, True), (23171, False)):
    if fits:
      buckets.check_grid_bytes('ids', (length, length), 1, length, 0)
    else:
      with pytest.raises(ValueError, match=TOO_BIG):
        buckets.check_grid_bytes('ids', (length, length), 1, length, 0)


def test_the_limit_can_be_set_and_a_grid_at_it_still_works(monkeypatch):
  # A grid no other test builds, so its ids are not cached yet.
  args = ('quant', 5, 7, 2, 1.23, 2.46, 9.84)
  length = 2 + 5 * 7
  at_limit = 4 * length ** 2
  monkeypatch.setenv('IRPE_JAX_MAX_IDS_BYTES', str(at_limit - 1))
  g = buckets.get_bucket_geometry(*args)
  with pytest.raises(ValueError, match=f'{at_limit} bytes .* over the limit '
                     f'of {at_limit - 1} bytes'):
    g.ids  # pylint: disable=pointless-statement
  monkeypatch.setenv('IRPE_JAX_MAX_IDS_BYTES', str(at_limit))
  assert g.ids.shape == (length, length)  # The refusal was not cached.
  monkeypatch.delenv('IRPE_JAX_MAX_IDS_BYTES')
  monkeypatch.setattr(buckets, 'MAX_IDS_BYTES', 2 ** 20)
  with pytest.raises(ValueError, match='limit of 1048576 bytes'):
    buckets.get_bucket_ids_2d('euc', 23, 23, 1, 1.23, 2.46, 9.84)


@pytest.mark.parametrize('value', ['', 'lots', '0', '-5', '1.5e9'])
def test_a_bad_limit_in_the_environment_is_named(monkeypatch, value):
  monkeypatch.setenv('IRPE_JAX_MAX_IDS_BYTES', value)
  with pytest.raises(ValueError, match='IRPE_JAX_MAX_IDS_BYTES=.*expected a '
                     'whole number of bytes'):
    buckets.get_bucket_ids_2d('euc', 2, 3, 0, *RATIO)


def test_the_factored_scatter_needs_no_full_ids_but_checks_its_classes():
  # With the limit just under its ids, the factored scatter still traces:
  # it reads only the classes; the one-hot one needs the (L, L) ids.
  g = buckets.get_bucket_geometry('product', 60, 60, 1, *RATIO)
  a = jax.ShapeDtypeStruct((1, 1, g.length, g.length), jnp.float32)
  saved = buckets.MAX_IDS_BYTES
  try:
    buckets.MAX_IDS_BYTES = 4 * g.length ** 2 - 1
    out = jax.eval_shape(
        lambda a: ops.bucket_scatter(a, g, impl='factored'), a)
    assert out.shape == (1, 1, g.length, g.num_buckets)
    with pytest.raises(ValueError, match=TOO_BIG):
      jax.eval_shape(lambda a: ops.bucket_scatter(a, g, impl='onehot'), a)
  finally:
    buckets.MAX_IDS_BYTES = saved
  # A 1 x 40000 grid: its (h + w, L) classes alone would be 6.4 GB.
  line = buckets.get_bucket_geometry('product', 1, 40000, 0, *RATIO)
  a = jax.ShapeDtypeStruct((1, 1, 40000, 40000), jnp.float32)
  with pytest.raises(ValueError, match=r'\(h \+ w, L\) offset classes .* '
                     r'shape \(40001, 40000\), 6400160000 bytes'):
    jax.eval_shape(lambda a: ops.bucket_scatter(a, line, impl='factored'), a)


def test_a_gather_index_past_int32_is_refused():
  ids = np.zeros((2, 2), np.int32)
  z = jax.ShapeDtypeStruct((1, 1, 2, 2 ** 30 + 1), jnp.float32)
  with pytest.raises(ValueError, match='more than an int32 gather index'):
    jax.eval_shape(lambda z: ops.bucket_gather(z, ids, 2 ** 30 + 1,
                                               impl='factored'), z)
