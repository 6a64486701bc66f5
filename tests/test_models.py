"""Tests of the DeiT-iRPE VisionTransformer and its registry."""

import json
import re

import chex
import flax
import flax.nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import models
from irpe_jax.models import registry
from irpe_jax.models import vit
import golden

REGISTERED = json.loads((golden.GOLDEN_DIR / 'registered_models.json')
                        .read_text())
NAME = re.compile(r'^deit_(tiny|small|base)(_distilled)?_patch16_224'
                  r'(?:_(bias|ctx)_(euc|quant|cross|product)_(\d+)_'
                  r'(shared|unshared)_([qkv]+))?(_noabs)?$')

# A tiny model: 16x16 images of 4x4 patches give a 4x4 grid.
TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
            num_classes=5)
RPE = irpe_jax.get_rpe_config(ratio=1.9, method='product', mode='ctx',
                              shared_head=True, skip=1, rpe_on='qkv')
IMAGES = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))


def count_params(model) -> int:
  size = model.img_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def tiny_model(**kwargs):
  return models.VisionTransformer(**{**TINY, 'rpe_config': RPE, **kwargs})


@pytest.fixture(scope='module')
def tiny():
  """A tiny model, its params and a jitted eval apply shared by the tests."""
  model = tiny_model()
  params = jax.jit(model.init)(jax.random.key(1), IMAGES)['params']
  # Non-zero tables, so that iRPE affects the outputs.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(len(path)), x.shape)
                       if 'lookup_table' in str(path[-1]) else x), params)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x))
  return model, params, apply


@pytest.mark.parametrize('name', sorted(REGISTERED))
def test_released_models_have_the_release_param_counts(name):
  spec = REGISTERED[name]
  assert count_params(models.create_model(name)) == spec['num_params']
  assert models.create_model(name).rpe_config == irpe_jax.get_rpe_config(
      **spec['rpe_config'])


@pytest.mark.parametrize('name, count', [
    # timm's DeiT parameter counts.
    ('deit_tiny_patch16_224', 5_717_416),
    ('deit_small_patch16_224', 22_050_664),
    ('deit_base_patch16_224', 86_567_656),
    ('deit_tiny_distilled_patch16_224', 5_910_800),
])
def test_plain_deit_has_timm_param_counts(name, count):
  assert count_params(models.create_model(name)) == count


def test_every_registered_name_describes_its_model():
  names = models.list_models()
  assert set(models.RELEASED) <= set(names)
  assert len(names) >= 30
  for name in names:
    size, distilled, mode, method, tag, heads, on, noabs = (
        NAME.match(name).groups())
    model = models.create_model(name)
    assert model.embed_dim == {'tiny': 192, 'small': 384, 'base': 768}[size]
    assert model.distilled == bool(distilled)
    assert model.use_abs_pos_embed == (noabs is None)
    cfg = model.rpe_config
    if mode is None:
      assert cfg is None
      continue
    assert [t for t in 'qkv' if getattr(cfg, 'rpe_' + t)] == list(on)
    single = next(c for c in (cfg.rpe_q, cfg.rpe_k, cfg.rpe_v) if c)
    assert single.mode == {'bias': 'bias', 'ctx': 'contextual'}[mode]
    assert single.method == method
    assert single.shared_head == (heads == 'shared')
    assert int(tag) == registry.bucket_tag(method, single.alpha)


def test_list_models_filters_and_create_model_rejects_unknown_names():
  assert models.list_models('*_shared_qkv') == [
      'deit_base_patch16_224_ctx_product_50_shared_qkv',
      'deit_small_patch16_224_ctx_product_50_shared_qkv']
  with pytest.raises(ValueError, match='deit_small_patch16_224'):
    models.create_model('deit_small_patch16_224_ctx_product_49_shared_k')
  with pytest.raises(TypeError, match='embed_dims'):
    models.create_model('deit_tiny_patch16_224', embed_dims=3)


def test_create_model_applies_overrides():
  model = models.create_model('deit_small_patch16_224_ctx_product_50_shared_k',
                              num_classes=10, drop_path_rate=0.1)
  assert (model.num_classes, model.drop_path_rate, model.depth) == (10, 0.1,
                                                                    12)


def test_forward_gives_logits_and_sows_attention_weights(tiny):
  model, params, apply = tiny
  logits = apply(params, IMAGES)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  _, state = model.apply({'params': params}, IMAGES,
                         mutable=['intermediates'])
  for i in range(2):
    (weights,) = state['intermediates'][f'blocks_{i}']['attn'][
        'attention_weights']
    assert weights.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-5)


def test_the_rpe_tables_change_the_output(tiny):
  model, params, apply = tiny
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.zeros_like(x) if 'lookup_table' in str(path[-1])
                       else x), params)
  assert not np.allclose(apply(params, IMAGES), apply(zeroed, IMAGES))


def test_resample_posemb_is_identity_at_the_trained_grid():
  posemb = jax.random.normal(jax.random.key(2), (1, 1 + 16, 8))
  assert models.resample_posemb(posemb, (4, 4), 1) is posemb


def test_resample_posemb_keeps_prefix_and_constants():
  posemb = jnp.concatenate([jnp.full((1, 1, 8), 7.0),
                            jnp.full((1, 16, 8), 3.0)], axis=1)
  new = models.resample_posemb(posemb, (6, 3), 1)
  assert new.shape == (1, 1 + 18, 8)
  np.testing.assert_allclose(new[0, 0], 7.0)
  np.testing.assert_allclose(new[0, 1:], 3.0, rtol=1e-6)
  with pytest.raises(ValueError, match='old_grid'):
    models.resample_posemb(posemb, (6, 3), 2)


def test_other_image_sizes_use_the_resampled_embedding_and_their_grid(tiny):
  """Applying at 24x16 equals a model built for 24x16 with resampled params."""
  model, params, apply = tiny
  images = jax.random.normal(jax.random.key(3), (2, 24, 16, 3))
  logits, state = model.apply({'params': params}, images,
                              mutable=['intermediates'])
  (weights,) = state['intermediates']['blocks_0']['attn']['attention_weights']
  assert weights.shape == (2, 2, 1 + 6 * 4, 1 + 6 * 4)
  wide = model.clone(img_size=(24, 16))
  resized = dict(params, pos_embed=models.resample_posemb(
      params['pos_embed'], (6, 4), 1))
  np.testing.assert_allclose(
      logits, wide.apply({'params': resized}, images), rtol=1e-5, atol=1e-6)


def test_remat_gives_equal_outputs_and_gradients(tiny):
  model, params, _ = tiny
  rngs = {'dropout': jax.random.key(4)}
  # One block keeps the two compiles cheap.
  trained = model.clone(drop_path_rate=0.2, depth=1)
  params = {k: v for k, v in params.items() if k != 'blocks_1'}

  def loss(p, m):
    return m.apply({'params': p}, IMAGES, train=True, rngs=rngs).sum()

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = grad_fn(params, trained)
  value_r, grads_r = grad_fn(params, trained.clone(remat=True))
  np.testing.assert_allclose(value, value_r, rtol=1e-6)
  chex.assert_trees_all_close(grads, grads_r, rtol=1e-5, atol=1e-6)


def test_jit_traces_once_per_image_shape(tiny):
  model, params, _ = tiny

  @jax.jit
  @chex.assert_max_traces(n=2)
  def forward(p, x):
    return model.apply({'params': p}, x)

  for _ in range(2):
    forward(params, IMAGES)
    forward(params, IMAGES[:, :12])


def test_train_mode_is_stochastic_and_eval_is_not(tiny):
  model, params, _ = tiny
  model = model.clone(drop_path_rate=0.5)
  outs = [model.apply({'params': params}, IMAGES, train=True,
                      rngs={'dropout': jax.random.key(k)}) for k in (0, 1)]
  assert not np.allclose(outs[0], outs[1])
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply({'params': params}, IMAGES, train=True)


def test_distilled_model_averages_its_heads_at_eval():
  model = tiny_model(distilled=True, depth=1)
  variables = jax.jit(model.init)(jax.random.key(5), IMAGES)
  assert variables['params']['dist_token'].shape == (1, 1, 16)
  assert variables['params']['pos_embed'].shape == (1, 2 + 16, 16)

  @jax.jit
  def both(variables):
    heads = model.apply(variables, IMAGES, train=True)  # No dropout set.
    return heads, model.apply(variables, IMAGES)

  (cls_logits, dist_logits), logits = both(variables)
  np.testing.assert_allclose(logits, (cls_logits + dist_logits) / 2,
                             rtol=1e-6)


def test_no_abs_pos_embed_and_headless_features():
  model = tiny_model(use_abs_pos_embed=False, num_classes=0, rpe_config=None)
  variables = jax.eval_shape(model.init, jax.random.key(6), IMAGES)
  assert 'pos_embed' not in variables['params']
  assert 'head' not in variables['params']
  assert jax.eval_shape(model.apply, variables, IMAGES).shape == (2, 16)


def test_nnx_bridge_holds_the_linen_params_and_draws_dropout(tiny):
  model, params, apply = tiny
  module = models.to_nnx(model.clone(drop_path_rate=0.5), params)
  state = flax.nnx.to_pure_dict(flax.nnx.state(module, flax.nnx.Param))
  chex.assert_trees_all_equal(state, params)
  forward = flax.nnx.jit(lambda m, x, train: m(x, train=train),
                         static_argnums=2)
  np.testing.assert_allclose(forward(module, IMAGES, False),
                             apply(params, IMAGES), rtol=1e-5, atol=1e-6)
  first, second = forward(module, IMAGES, True), forward(module, IMAGES, True)
  assert not np.allclose(first, second)
  fresh = models.to_nnx(model, rngs=flax.nnx.Rngs(params=0, dropout=1))
  assert jax.tree.map(jnp.shape, flax.nnx.to_pure_dict(
      flax.nnx.state(fresh, flax.nnx.Param))) == jax.tree.map(jnp.shape, params)


def test_bfloat16_computation_keeps_float32_params():
  model = tiny_model(dtype=jnp.bfloat16, depth=1)
  variables = jax.eval_shape(model.init, jax.random.key(7), IMAGES)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype('float32')}
  assert jax.eval_shape(model.apply, variables, IMAGES).dtype == jnp.bfloat16


def test_sizes_are_deits():
  # Touvron et al. 2021, Table 1; the registry builds every size from here.
  assert {s: (v['embed_dim'], v['num_heads']) for s, v in vit.SIZES.items()} \
      == {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12)}
  base = models.VisionTransformer()
  assert (base.embed_dim, base.num_heads) == (768, 12)


@pytest.mark.parametrize('fields, error, match', [
    (dict(patch_size=0), ValueError, 'patch_size must be >= 1, got 0'),
    (dict(num_heads=0), ValueError, 'num_heads must be >= 1, got 0'),
    (dict(num_heads=3), ValueError, 'embed_dim=16 is not divisible by '
                                    'num_heads=3'),
    (dict(embed_dim=16.0), TypeError, 'embed_dim must be an int'),
    (dict(img_size=(16, 0)), ValueError, r'img_size\[1\] must be >= 1'),
])
def test_bad_fields_are_rejected(fields, error, match):
  model = tiny_model(**fields)
  with pytest.raises(error, match=match):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)


@pytest.mark.parametrize('shape, match', [
    ((2, 16, 16, 4), 'NHWC'),
    ((2, 3, 16, 16), 'NHWC'),
    ((2, 2, 16, 3), 'smaller than one'),
])
def test_bad_images_are_rejected(tiny, shape, match):
  model, params, _ = tiny
  with pytest.raises(ValueError, match=match):
    model.apply({'params': params}, jnp.zeros(shape))
