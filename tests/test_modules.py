"""Linen and NNX modules: behaviour, equality of the two APIs, clear errors."""

import ast
import pathlib

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import linen as irpe_linen
import irpe_jax.nnx as irpe_nnx

NORMAL = jax.nn.initializers.normal(0.5)
CFG_K = irpe_jax.get_rpe_config(skip=1, rpe_on='k')
CFG_K0 = irpe_jax.get_rpe_config(skip=0, rpe_on='k')
CFG_CROSS_QKV = irpe_jax.get_rpe_config(method='cross', skip=1, rpe_on='qkv',
                                        shared_head=False)
B, N, C, HEADS = 2, 1 + 3 * 4, 16, 2


def _x(seed=0, shape=(B, N, C)):
  return jax.random.normal(jax.random.key(seed), shape)


def _attention(cfg=CFG_K, **kwargs):
  return irpe_jax.IRPEAttention(num_heads=HEADS, rpe_config=cfg,
                                table_init=NORMAL, **kwargs)


@pytest.fixture(scope='module')
def cross_qkv():
  module = _attention(CFG_CROSS_QKV)
  return module, module.init(jax.random.key(1), _x(), height=3, width=4)


def test_param_names_follow_the_release(cross_qkv):
  _, variables = cross_qkv
  shapes = jax.tree.map(jnp.shape, variables['params'])
  assert shapes['qkv'] == {'kernel': (C, 3 * C), 'bias': (3 * C,)}
  assert shapes['rpe_k']['rp_rows'] == {'lookup_table_weight': (HEADS, 8, 8)}
  assert shapes['rpe_v']['rp_cols'] == {'lookup_table_weight': (HEADS, 8, 8)}


def test_nnx_equals_linen_for_equal_params(cross_qkv):
  module, variables = cross_qkv
  twin = irpe_nnx.IRPEAttention(C, HEADS, CFG_CROSS_QKV, rngs=nnx.Rngs(0))
  nnx.update(twin, variables['params'])
  x = _x(2)
  chex.assert_trees_all_close(
      twin(x, height=3, width=4),
      module.apply(variables, x, height=3, width=4), rtol=1e-6)
  linen_state = jax.tree.map(jnp.shape, variables['params'])
  nnx_state = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(twin,
                                                                 nnx.Param)))
  assert linen_state == nnx_state


@pytest.mark.parametrize('mode,method,for_qk', [
    ('bias', 'euc', True), ('contextual', 'quant', True),
    ('contextual', 'product', False)])
def test_nnx_irpe_equals_linen(mode, method, for_qk):
  cfg = irpe_jax.get_single_rpe_config(method=method, mode=mode, skip=1)
  linen = irpe_jax.IRPE(head_dim=4, num_heads=2, for_qk=for_qk,
                        rpe_config=cfg, table_init=NORMAL)
  x = _x(3, (B, 2, N, N if not for_qk else 4))
  variables = linen.init(jax.random.key(4), x, 3, 4)
  twin = irpe_nnx.IRPE(head_dim=4, num_heads=2, for_qk=for_qk,
                       rpe_config=cfg, rngs=nnx.Rngs(0))
  nnx.update(twin, variables['params'])
  chex.assert_trees_all_close(twin(x, 3, 4), linen.apply(variables, x, 3, 4))


@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_mode_field_overrides_the_config(api):
  # A contextual config, a bias module: the table and the lookup are bias.
  cfg = irpe_jax.get_single_rpe_config(mode='contextual', skip=1)
  x = _x(3, (B, 2, N, 4))
  if api == 'linen':
    module = irpe_jax.IRPE(head_dim=4, num_heads=2, mode='bias',
                           rpe_config=cfg, table_init=NORMAL)
    variables = module.init(jax.random.key(4), x, 3, 4)
    table = variables['params']['lookup_table_bias']
    out = module.apply(variables, x, 3, 4)
  else:
    module = irpe_nnx.IRPE(head_dim=4, num_heads=2, mode='bias',
                           rpe_config=cfg, table_init=NORMAL,
                           rngs=nnx.Rngs(4))
    table, out = module.lookup_table_bias[...], module(x, 3, 4)
  ids, _ = irpe_jax.get_bucket_ids_2d('product', 3, 4, 1, cfg.alpha,
                                      cfg.beta, cfg.gamma)
  chex.assert_trees_all_close(out, table[:, ids][None])


@pytest.mark.parametrize('method', ['product', 'cross'])
def test_x_tokens_last_puts_the_tokens_of_x_last(method):
  cfg = irpe_jax.get_single_rpe_config(method=method, skip=1)
  x = _x(5, (B, 2, N, 4))
  linen = irpe_linen.build_single_rpe(cfg, True, 4, 2, table_init=NORMAL)
  variables = linen.init(jax.random.key(6), x, 3, 4)
  twin = irpe_nnx.build_single_rpe(cfg, True, 4, 2, rngs=nnx.Rngs(0))
  nnx.update(twin, variables['params'])
  expected = jnp.swapaxes(linen.apply(variables, x, 3, 4), -1, -2)
  chex.assert_trees_all_close(
      linen.apply(variables, x, 3, 4, x_tokens_last=True), expected)
  chex.assert_trees_all_close(twin(x, 3, 4, x_tokens_last=True), expected)


@pytest.mark.parametrize('mode,method,for_qk', [
    ('contextual', 'product', True), ('contextual', 'cross', True),
    ('contextual', 'product', False), ('bias', 'product', True)])
def test_scale_encodes_the_scaled_input(mode, method, for_qk):
  # Contextual lookups are linear in x, so `scale` may go on the table; a
  # bias does not depend on x at all. Linen and NNX agree on both.
  cfg = irpe_jax.get_single_rpe_config(method=method, mode=mode, skip=1)
  x = _x(7, (B, 2, N, 4 if for_qk else N))
  linen = irpe_linen.build_single_rpe(cfg, for_qk, 4, 2,
                                      table_init=NORMAL)
  variables = linen.init(jax.random.key(8), x, 3, 4)
  twin = irpe_nnx.build_single_rpe(cfg, for_qk, 4, 2, rngs=nnx.Rngs(0))
  nnx.update(twin, variables['params'])
  scale = 0.3
  expected = linen.apply(variables, x * scale, 3, 4)
  got = linen.apply(variables, x, 3, 4, scale=scale)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(twin(x, 3, 4, scale=scale), got)
  if for_qk:
    chex.assert_trees_all_close(
        linen.apply(variables, x, 3, 4, scale=scale, x_tokens_last=True),
        jnp.swapaxes(got, -1, -2))


def test_traces_once_per_input_shape(cross_qkv):
  module, variables = cross_qkv

  @jax.jit
  @chex.assert_max_traces(n=2)
  def apply(variables, x):
    return module.apply(variables, x)

  for _ in range(3):
    apply(variables, _x(shape=(B, 1 + 4 * 4, C)))  # 4x4 grid by default
  for _ in range(2):
    apply(variables, _x(shape=(B, 1 + 5 * 5, C)))  # new shape: one retrace


def test_grid_may_be_non_square_and_change_per_call(cross_qkv):
  module, variables = cross_qkv
  x = _x()
  a = module.apply(variables, x, height=3, width=4)
  b = module.apply(variables, x, height=4, width=3)
  assert a.shape == b.shape == x.shape
  assert not np.allclose(a, b)


def test_key_padding_mask_hides_padded_keys():
  module = _attention(irpe_jax.get_rpe_config(skip=0, rpe_on='qkv'))
  x = _x(shape=(B, 12, C))
  variables = module.init(jax.random.key(5), x, height=3, width=4)
  keep = jnp.arange(12) < 8
  mask = jnp.broadcast_to(keep, (B, 1, 1, 12))
  # Changing padded tokens only through k/v must not move valid outputs.
  x_padded_changed = jnp.where(keep[None, :, None], x, 100.0)
  a = module.apply(variables, x, x, x, height=3, width=4, mask=mask)
  b = module.apply(variables, x, x_padded_changed, x_padded_changed,
                   height=3, width=4, mask=mask)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attention_weights_are_sown(cross_qkv):
  module, variables = cross_qkv
  _, state = module.apply(variables, _x(), height=3, width=4,
                          mutable=['intermediates'])
  (weights,) = state['intermediates']['attention_weights']
  assert weights.shape == (B, HEADS, N, N)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_dropout_only_when_not_deterministic():
  module = _attention(dropout_rate=0.5, proj_dropout_rate=0.1)
  x, grid = _x(), dict(height=3, width=4)
  variables = module.init(jax.random.key(6), x, **grid)
  det = module.apply(variables, x, **grid)
  np.testing.assert_array_equal(det, module.apply(variables, x, **grid))
  rngs = {'dropout': jax.random.key(7)}
  train = module.apply(variables, x, deterministic=False, rngs=rngs, **grid)
  assert not np.allclose(det, train)
  np.testing.assert_array_equal(train, module.apply(
      variables, x, deterministic=False, rngs=rngs, **grid))


# bfloat16 keeps 8 significant bits (relative step 2**-8 = 0.4%); through the
# projections, the lookups and the softmax the outputs and gradients of this
# layer stay within 1.6% of the largest float32 value (seeds 0-3). 3% of the
# largest value, elementwise, leaves room for that and fails an output that
# is 20% off anywhere near its largest entries.
BF16_BOUND = 0.03


def _assert_close_to_largest(actual, expected, bound, name):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected)
  err = np.abs(actual - expected).max() / np.abs(expected).max()
  assert err <= bound, f'{name}: max error {err:.4f} of the largest entry'


def test_bfloat16_compute_with_float32_params():
  module = _attention(CFG_CROSS_QKV, dtype=jnp.bfloat16)
  reference = _attention(CFG_CROSS_QKV)
  x, cotangent = _x(), _x(9)
  variables = module.init(jax.random.key(8), x, height=3, width=4)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))

  def forward_and_grads(m):
    def loss(v):
      y = m.apply(v, x, height=3, width=4)
      return jnp.sum(y.astype(jnp.float32) * cotangent), y
    return jax.grad(loss, has_aux=True)(variables)[::-1]

  y, grads = forward_and_grads(module)
  y_ref, grads_ref = forward_and_grads(reference)
  assert y.dtype == jnp.bfloat16
  _assert_close_to_largest(y, y_ref, BF16_BOUND, 'y')
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(grads_ref)):
    assert g.dtype == jnp.float32
    _assert_close_to_largest(g, g_ref, BF16_BOUND,
                             jax.tree_util.keystr(path))
  with pytest.raises(AssertionError):  # The bound does catch a 20% error.
    _assert_close_to_largest(y_ref * 1.2, y_ref, BF16_BOUND, 'y')


def test_torch_xavier_uniform_uses_torch_fans():
  init = irpe_jax.torch_xavier_uniform()
  table = init(jax.random.key(0), (1, 8, 81))
  bound = (6.0 / (8 * 81 + 1 * 81)) ** 0.5
  assert float(jnp.max(jnp.abs(table))) <= bound
  assert float(jnp.max(jnp.abs(table))) > 0.9 * bound


def _init(module, *args, **kwargs):
  return module.init(jax.random.key(0), *args, **kwargs)


@pytest.mark.parametrize('build,args,kwargs,error,match', [
    (lambda: irpe_jax.IRPE(head_dim=4, for_qk=False, mode='bias',
                           rpe_config=CFG_K.rpe_k),
     ((B, 1, N, N),), {}, ValueError, "mode='bias' does not exist on v"),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k,
                           method='chebyshev'),
     ((B, 1, N, 4),), {}, ValueError, "Unknown method 'chebyshev'"),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_CROSS_QKV.rpe_k),
     ((B, 1, N, 4),), {}, ValueError, 'use IRPECross'),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=None),
     ((B, 1, N, 4),), {}, TypeError, 'rpe_config must be a SingleRPEConfig'),
    # A config for skip=1 fed a sequence without a class token.
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((B, 1, 16, 4),), dict(height=4, width=4), ValueError,
     'L=16 tokens, but height=4, width=4 and the configured skip=1 need '
     'L = skip \\+ height\\*width = 17'),
    # ... or one with 5 leading tokens on a 3x4 grid: not 5 skip tokens.
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((B, 1, 17, 4),), dict(height=3, width=4), ValueError,
     'L=17 tokens, but height=3, width=4 and the configured skip=1 need '
     'L = skip \\+ height\\*width = 13 \\(L=17 would leave 5 leading'),
    # A 50-bucket table (skip>=1) on a skip=0 config and input.
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K0.rpe_k,
                           num_buckets=50),
     ((B, 1, 16, 4),), dict(height=4, width=4), ValueError,
     'skip=0 and needs 49; a 50-bucket table fits skip>=1'),
    # Without height/width, L must be the config's skip + a square grid: the
    # release would run 1 + 12x16 tokens on 13x13 with 24 "skip" tokens.
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((B, 1, 1 + 12 * 16, 4),), {}, ValueError,
     'L=193 tokens, which is not skip \\+ a square grid for the configured '
     'skip=1 .* pass height= and width='),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((B, 1, 18, 4),), {}, ValueError, 'L=18 .* pass height= and width='),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((B, 1, 20, 4),), {}, ValueError, 'L=20 .* pass height= and width='),
    (lambda: _attention(), ((B, 20, C),), {}, ValueError,
     'L=20 .* pass height= and width='),
    (lambda: irpe_jax.IRPE(head_dim=0, rpe_config=CFG_K.rpe_k),
     ((B, 1, N, 4),), {}, ValueError, 'head_dim must be >= 1, got 0'),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k,
                           num_buckets=2 ** 40),
     ((B, 1, N, 4),), {}, ValueError, 'num_buckets must be >= 1 and <= 262144'),
    (lambda: irpe_jax.IRPEAttention(num_heads=0), ((B, N, C),), {},
     ValueError, 'num_heads must be >= 1, got 0'),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((B, 1, 10, 4),), dict(height=3, width=4), ValueError,
     'L=10 tokens, fewer than height\\*width'),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((1, N, 4),), {}, ValueError, 'x must have rank 4'),
    (lambda: irpe_jax.IRPE(head_dim=4, rpe_config=CFG_K.rpe_k),
     ((B, 1, N, 4),), dict(height=3), ValueError,
     'Give both height and width'),
    (lambda: irpe_jax.IRPE(head_dim=4, for_qk=False,
                           rpe_config=CFG_K.rpe_k),
     ((B, 1, N, 4),), {}, ValueError, 'rpe on v takes attention weights'),
    (lambda: irpe_jax.IRPE(head_dim=4, for_qk=False,
                           rpe_config=CFG_K.rpe_k),
     ((B, 1, N, N),), dict(x_tokens_last=True), ValueError,
     'x_tokens_last=True needs a q/k table'),
    (lambda: _attention(), ((B, N, 15),), {}, ValueError,
     'feature size 15 is not divisible by num_heads=2'),
    (lambda: _attention(), ((N, C),), {}, ValueError,
     'inputs_q must have rank 3'),
    (lambda: _attention(), ((B, N, C), (B, N + 1, C)), {}, ValueError,
     'inputs_k has shape'),
    (lambda: _attention(), ((B, N, C),),
     dict(mask=jnp.ones((B, N), bool)), ValueError, 'does not broadcast'),
    (lambda: _attention(), ((B, N, C),),
     dict(mask=jnp.ones((B, 1, 1, N))), TypeError, 'mask must be boolean'),
])
def test_bad_input_raises_at_trace_time(build, args, kwargs, error, match):
  arrays = [jax.ShapeDtypeStruct(s, jnp.float32) for s in args]
  with pytest.raises(error, match=match):
    jax.eval_shape(lambda *a: _init(build(), *a, **kwargs), *arrays)


def test_table_heads_must_match_input_heads():
  module = irpe_jax.IRPE(head_dim=4, num_heads=3, rpe_config=CFG_K.rpe_k)
  with pytest.raises(ValueError,
                     match='The table has 3 heads; the input has 2'):
    _init(module, jnp.zeros((B, 2, N, 4)))


def test_build_rpe_follows_config():
  rpe_q, rpe_k, rpe_v = irpe_jax.build_rpe(CFG_CROSS_QKV, 8, 4)
  assert isinstance(rpe_q, irpe_jax.IRPECross) and rpe_q.num_heads == 4
  assert rpe_q.for_qk and not rpe_v.for_qk
  assert irpe_jax.build_rpe(None, 8, 4) == (None, None, None)
  assert irpe_jax.build_rpe(CFG_K, 8, 4)[1].num_heads == 1  # shared head
  with pytest.raises(TypeError, match='config must be an RPEConfig'):
    irpe_jax.build_rpe({'rpe_k': None}, 8, 4)


def test_nnx_rejects_bad_sizes_at_construction():
  with pytest.raises(ValueError, match='num_heads must be >= 1, got 0'):
    irpe_nnx.IRPEAttention(C, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='not divisible by num_heads=3'):
    irpe_nnx.IRPEAttention(C, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='head_dim must be >= 1, got 0'):
    irpe_nnx.IRPE(0, rpe_config=CFG_K.rpe_k, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='use IRPECross'):
    irpe_nnx.IRPE(4, rpe_config=CFG_CROSS_QKV.rpe_k, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="IRPECross needs method='cross'"):
    irpe_nnx.IRPECross(4, rpe_config=CFG_K.rpe_k, rngs=nnx.Rngs(0))


def _irpe_imports(path):
  """Modules that a file of the package imports (`irpe_jax.x`, `flax.y`)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def test_linen_and_nnx_stand_side_by_side_on_a_framework_free_core():
  package = pathlib.Path(irpe_jax.__file__).parent
  imports = {f.stem: _irpe_imports(f) for f in package.glob('*.py')}
  assert 'irpe_jax.linen' not in imports['nnx']
  assert not any(n.startswith('flax.linen') for n in imports['nnx'])
  assert 'irpe_jax.nnx' not in imports['linen']
  assert 'flax.nnx' not in imports['linen']
  for core in ('_checks', 'buckets', 'ops', 'config', 'core', 'tables',
               'attention', 'initializers'):
    assert not any(n.split('.')[0] == 'flax' or
                   n in ('irpe_jax.linen', 'irpe_jax.nnx', 'irpe_jax.models')
                   for n in imports[core]), (core, imports[core])


def test_nnx_attention_weights_can_be_captured():
  model = irpe_nnx.IRPEAttention(C, HEADS, CFG_K, rngs=nnx.Rngs(0))
  if not hasattr(nnx, 'capture'):
    pytest.skip('this Flax has no nnx.capture')
  _, intermediates = nnx.capture(model, nnx.Intermediate)(_x(), height=3,
                                                          width=4)
  (weights,) = intermediates['attention_weights']
  assert weights.shape == (B, HEADS, N, N)


def test_a_query_with_every_key_masked_attends_uniformly():
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 1, 3, 2))
             for i in range(3))
  mask = jnp.ones((1, 1, 3, 3), bool).at[0, 0, 0].set(False)
  out = irpe_jax.attention_with_rpe(q, k, v, scale=1.0, mask=mask)
  np.testing.assert_allclose(out[0, 0, 0], v[0, 0].mean(0), rtol=1e-6)
  assert np.isfinite(out).all()
