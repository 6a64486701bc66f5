"""Blockwise attention equals the materialised path, outputs and gradients.

The equality cases run both blockwise implementations: 'blockwise' (XLA)
and 'pallas' (the fused kernels, in Pallas's interpreter here).

Blocks here are small (8 queries, 16 keys, or 5 x 7) so that every case
spans several blocks, none of which divides L, and the last key block is
mostly padding.
"""

import functools
import os

from flax import nnx
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import attention as attention_lib
from irpe_jax import _row_lookup
from irpe_jax import blockwise
from irpe_jax import buckets
from irpe_jax import nnx as irpe_nnx
import golden

RTOL = 1e-5
IMPLS = ('blockwise', 'pallas')
BLOCKS = dict(block_q=8, block_k=16)
MODULE_CASES = golden.cases('modules')


def _one_per_kind(cases):
  """One golden module case per (method, mode, target), the n-th kind
  taking its (n % 4)-th case, so skip 0/1 and shared/unshared heads all
  occur; `IRPE_JAX_ALL_GOLDEN=1` runs all 80 (about 4 minutes here)."""
  kinds = {}
  for case, arrays in cases:
    kinds.setdefault((case['method'], case['mode'], case['rpe_on']),
                     []).append((case, arrays))
  return [group[n % len(group)] for n, group in enumerate(kinds.values())]


if os.environ.get('IRPE_JAX_ALL_GOLDEN') != '1':
  MODULE_CASES = _one_per_kind(MODULE_CASES)
ATTENTION_CASES = golden.cases('attention')
DETR_CASES = golden.cases('detr_attention')


def _single(case):
  cfg = irpe_jax.get_single_rpe_config(
      ratio=case['ratio'], method=case['method'], mode=case['mode'],
      shared_head=case['shared_head'], skip=case['skip'])
  rpes = irpe_jax.build_rpe(
      irpe_jax.RPEConfig(rpe_q=cfg if case['rpe_on'] == 'q' else None,
                         rpe_k=cfg if case['rpe_on'] == 'k' else None,
                         rpe_v=cfg if case['rpe_on'] == 'v' else None),
      head_dim=case['head_dim'], num_heads=case['num_heads'])
  return dict(zip(RPE_NAMES, rpes))


def _assert_trees_close(actual, expected, rtol=RTOL, label=''):
  """Leaf by leaf; `value_and_grad` results compare output and gradients
  (their loss, a sum with cancellations, is no output)."""
  drop_loss = lambda r: (r[0][1], r[1]) if isinstance(r, tuple) and len(
      r) == 2 and isinstance(r[0], tuple) else r
  actual, expected = drop_loss(actual), drop_loss(expected)
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  for (path, want), got in zip(paths, jax.tree.leaves(actual)):
    golden.assert_close(got, want, rtol,
                        f'{label} {jax.tree_util.keystr(path)}'.strip())


def _each_impl(value_and_grad):
  """Jitted `[materialised, *IMPLS]` results of `value_and_grad(impl)`:
  one compile for all three (the materialised reference compiled once)."""
  return jax.jit(lambda *a: [value_and_grad(impl)(*a)
                             for impl in ('materialized',) + IMPLS])


def _assert_impls_close(results):
  want, *got = results
  for impl, result in zip(IMPLS, got):
    _assert_trees_close(result, want, label=impl)


@functools.lru_cache(maxsize=None)
def _module_case_fn(case_key):
  """Jitted `[loss and grads]` of one golden module case, per impl."""
  case, _ = next((c, a) for c, a in MODULE_CASES if c['key'] == case_key)
  modules = _single(case)
  height, width = case['height'], case['width']

  def loss(impl, params, q, k, v, cotangent):
    bound = _bound(modules, {name: {'params': params} for name in modules})
    out = attention_lib.attention_with_rpe(
        q, k, v, scale=0.37, height=height, width=width, attention_impl=impl,
        **BLOCKS, **bound)
    return jnp.sum(out * cotangent), out

  return _each_impl(lambda impl: jax.value_and_grad(
      functools.partial(loss, impl), argnums=(0, 1, 2, 3), has_aux=True))


RPE_NAMES = ('rpe_q', 'rpe_k', 'rpe_v')


def _bound(modules, variables):
  """The rpe modules' `apply`s with their variables, for attention_with_rpe.

  `modules` and `variables` map rpe names to modules (or None) and to
  their variables. Marked as the modules are, so the blockwise path may
  call them with `as_term=True`.
  """
  bound = {}
  for name, module in modules.items():
    if module is not None:
      bound[name] = functools.partial(module.apply, variables[name])
      bound[name].returns_terms = True
  return bound


@pytest.mark.parametrize('case,arrays', MODULE_CASES,
                         ids=[c['key'] for c, _ in MODULE_CASES])
def test_golden_module_blockwise_equals_materialized(case, arrays):
  """Each golden table, on its target, in attention: all paths agree."""
  params = golden.nest({n: jnp.asarray(arrays[f'param/{n}'])
                        for n in case['params']})
  batch, heads, dim = case['batch'], case['num_heads'], case['head_dim']
  length = case['skip'] + case['height'] * case['width']
  keys = jax.random.split(jax.random.key(len(case['key'])), 4)
  q, k, v, cotangent = (jax.random.normal(key, (batch, heads, length, dim))
                        for key in keys)
  _assert_impls_close(_module_case_fn(case['key'])(params, q, k, v,
                                                   cotangent))


def _attention_module(case, impl, **kwargs):
  cfg = irpe_jax.get_rpe_config(
      ratio=case['ratio'], method=case['method'], mode=case['mode'],
      shared_head=case['shared_head'], skip=case['skip'],
      rpe_on=case['rpe_on'])
  return irpe_jax.IRPEAttention(num_heads=case['num_heads'], rpe_config=cfg,
                                qkv_bias=case['qkv_bias'],
                                attention_impl=impl, **kwargs)


@pytest.mark.parametrize('case,arrays', ATTENTION_CASES,
                         ids=[c['key'] for c, _ in ATTENTION_CASES])
def test_golden_attention_blockwise_matches_release(case, arrays):
  """IRPEAttention, blockwise: equal to the release and to materialised."""
  import test_parity  # pylint: disable=g-import-not-at-top
  params = test_parity.torch_attention_params(
      {n: arrays[f'param/{n}'] for n in case['params']})

  def loss(impl, params, x):
    y = _attention_module(case, impl, **BLOCKS).apply(
        {'params': params}, x, height=case['height'], width=case['width'])
    return jnp.sum(y * arrays['cotangent']), y

  results = _each_impl(lambda impl: jax.value_and_grad(
      functools.partial(loss, impl), argnums=(0, 1), has_aux=True))(
          params, jnp.asarray(arrays['x']))
  for impl, ((_, y), (grads, grad_x)) in zip(IMPLS, results[1:]):
    golden.assert_close(y, arrays['y'], RTOL, f'{impl} y')
    golden.assert_close(grad_x, arrays['grad_x'], RTOL, f'{impl} grad_x')
    test_parity._assert_grads(grads, arrays, case['params'])
  _assert_impls_close(results)


@pytest.mark.parametrize('case,arrays', DETR_CASES,
                         ids=[c['key'] for c, _ in DETR_CASES])
def test_golden_detr_attention_blockwise_matches_release(case, arrays):
  """Non-square maps, key padding, q = k = src + pos and v = src, skip 0."""
  import test_parity  # pylint: disable=g-import-not-at-top
  cfg = irpe_jax.parse_rpe_string(
      f"rpe-{case['ratio']}-{case['method']}-{case['mode']}-"
      f"{int(case['shared_head'])}-{case['rpe_on']}")
  params = test_parity.torch_attention_params(
      {n: arrays[f'param/{n}'] for n in case['params']})
  batch_first = lambda a: jnp.asarray(a).transpose(1, 0, 2)
  pos = batch_first(arrays['pos_LBE'])
  mask = ~jnp.asarray(arrays['key_padding_mask'])[:, None, None, :]
  cotangent = batch_first(arrays['cotangent'])

  def loss(impl, params, src):
    module = irpe_jax.IRPEAttention(num_heads=case['num_heads'],
                                    rpe_config=cfg, attention_impl=impl,
                                    block_q=5, block_k=7)
    y = module.apply({'params': params}, src + pos, src + pos, src,
                     height=case['height'], width=case['width'], mask=mask)
    return jnp.sum(y * cotangent), y

  results = _each_impl(lambda impl: jax.value_and_grad(
      functools.partial(loss, impl), argnums=(0, 1), has_aux=True))(
          params, batch_first(arrays['src_LBE']))
  for impl, ((_, y), (grads, grad_src)) in zip(IMPLS, results[1:]):
    golden.assert_close(y, batch_first(arrays['y_LBE']), RTOL, f'{impl} y')
    golden.assert_close(grad_src, batch_first(arrays['grad_src']), RTOL,
                        f'{impl} grad_src')
    test_parity._assert_grads(grads, arrays, case['params'])
  _assert_impls_close(results)


METHODS = ('euc', 'quant', 'cross', 'product')


@st.composite
def _configs(draw):
  """A random iRPE attention: config, grid, blocks and mask."""
  skip = draw(st.integers(0, 2))
  single = lambda mode: irpe_jax.get_single_rpe_config(
      ratio=draw(st.sampled_from((0.6, 1.9, 3.0))),
      method=draw(st.sampled_from(METHODS)), mode=mode,
      shared_head=draw(st.booleans()), skip=skip)
  targets = draw(st.sets(st.sampled_from('qkv'), min_size=1))
  mode = lambda: draw(st.sampled_from(('bias', 'contextual')))
  config = irpe_jax.RPEConfig(
      rpe_q=single(mode()) if 'q' in targets else None,
      rpe_k=single(mode()) if 'k' in targets else None,
      rpe_v=single('contextual') if 'v' in targets else None)
  height, width = draw(st.integers(1, 5)), draw(st.integers(1, 6))
  length = skip + height * width
  hypothesis.assume(length >= 2)
  return dict(
      config=config, height=height, width=width, length=length,
      batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)),
      dim=draw(st.sampled_from((4, 8))),
      block_q=draw(st.integers(1, length + 2)),
      block_k=draw(st.integers(1, length + 2)),
      mask=draw(st.sampled_from(('none', 'keys', 'full'))),
      seed=draw(st.integers(0, 2 ** 16)))


def _random_mask(kind, batch, heads, length, key):
  if kind == 'none':
    return None
  if kind == 'keys':  # DETR's key padding; image 0 pads every key.
    mask = jax.random.bernoulli(key, 0.6, (batch, 1, 1, length))
    return mask.at[0].set(False)
  mask = jax.random.bernoulli(key, 0.5, (batch, heads, length, length))
  return mask.at[:, :, 0].set(False)  # Query 0 attends to nothing.


_HYPOTHESIS = hypothesis.settings(
    max_examples=6, deadline=None, derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck))


@_HYPOTHESIS
@hypothesis.given(_configs())
def test_random_configs_blockwise_equals_materialized(draw):
  """Odd lengths, blocks that do not divide L, all-masked rows."""
  _check_random_config(draw, 'blockwise')


@_HYPOTHESIS
@hypothesis.given(_configs())
def test_random_configs_pallas_equals_materialized(draw):
  """As above, through the kernels; their masks are key masks."""
  _check_random_config(dict(draw, mask=draw['mask'].replace('full', 'keys')),
                       'pallas')


def _check_random_config(draw, impl):
  b, h, n, d = draw['batch'], draw['heads'], draw['length'], draw['dim']
  keys = jax.random.split(jax.random.key(draw['seed']), 6)
  q, k, v, cotangent = (jax.random.normal(key, (b, h, n, d))
                        for key in keys[:4])
  mask = _random_mask(draw['mask'], b, h, n, keys[4])
  rpes = irpe_jax.build_rpe(draw['config'], d, h,
                            table_init=jax.nn.initializers.normal(1.0))
  variables = {name: module.init(keys[5], q if name != 'rpe_v' else
                                 jnp.ones((b, h, n, n)), draw['height'],
                                 draw['width'])
               for name, module in zip(RPE_NAMES, rpes)
               if module is not None}

  def loss(impl, variables, q, k, v):
    bound = _bound(dict(zip(RPE_NAMES, rpes)), variables)
    out = attention_lib.attention_with_rpe(
        q, k, v, scale=d ** -0.5, mask=mask, height=draw['height'],
        width=draw['width'], attention_impl=impl, block_q=draw['block_q'],
        block_k=draw['block_k'], **bound)
    return jnp.sum(out * cotangent), out

  both = jax.jit(lambda *a: [jax.value_and_grad(
      functools.partial(loss, i), argnums=(0, 1, 2, 3), has_aux=True)(*a)
                             for i in ('materialized', impl)])
  want, got = both(variables, q, k, v)
  _assert_trees_close(got, want)


def test_block_ids_equal_the_geometry_ids():
  for method, height, width, skip in (('product', 4, 5, 1),
                                      ('euc', 3, 7, 2), ('quant', 1, 6, 0),
                                      ('cross_rows', 5, 2, 1),
                                      ('cross_cols', 2, 2, 0)):
    g = buckets.get_bucket_geometry(method, height, width, skip, 1.9, 3.8,
                                    15.2)
    tokens = jnp.arange(g.length + 3)  # Three padding tokens.
    ids = np.asarray(blockwise.block_ids(g, tokens[:, None],
                                         tokens[None, :]))
    np.testing.assert_array_equal(ids[:g.length, :g.length], g.ids)
    assert (ids[g.length:] == g.num_buckets - 1).all()
    assert (ids[:, g.length:] == g.num_buckets - 1).all()


def test_row_lookup_equals_the_gather_at_the_geometry_ids():
  for method, height, width, skip in (('product', 5, 7, 1), ('euc', 6, 4, 0),
                                      ('cross_rows', 4, 5, 2),
                                      ('quant', 3, 9, 1)):
    g = buckets.get_bucket_geometry(method, height, width, skip, 1.9, 3.8,
                                    15.2)
    z = jax.random.normal(jax.random.key(0), (2, 3, g.length, g.num_buckets))
    # Every query, and a block of queries that starts mid-row.
    row_blocks = ((0, height), (1, 2), (height - 1, 1))
    for q_tokens in (np.arange(g.length), np.arange(2, 2 + width + 3)):
      # Jitted, the first rows traced, as blockwise attention runs it
      # (eagerly, each of its small ops compiles on its own).
      lookups = jax.jit(
          lambda z, first_rows, q_tokens=q_tokens, g=g, rows=row_blocks: [
              _row_lookup.RowLookup(g, jnp.asarray(q_tokens, jnp.int32), z)(
                  first_rows[i], n_rows)
              for i, (_, n_rows) in enumerate(rows)])(
                  z[:, :, q_tokens],
                  jnp.asarray([first for first, _ in row_blocks], jnp.int32))
      for (first_row, rows), got in zip(row_blocks, lookups):
        keys = skip + first_row * width + np.arange(rows * width)
        want = np.take_along_axis(np.asarray(z)[:, :, q_tokens],
                                  g.ids[q_tokens][:, keys][None, None], -1)
        np.testing.assert_array_equal(got, want)


def test_key_blocks_are_grid_rows_with_rpe_k_and_tokens_otherwise():
  g = buckets.get_bucket_geometry('product', 6, 5, 1, 1.9, 3.8, 15.2)
  rpe_k, rpe_q = (g, False, True), (g, True, True)
  plan = blockwise._plan_key_blocks
  # The skip token, then blocks of round(12 / 5) = 2 rows.
  assert plan(12, 31, (rpe_q, rpe_k)) == (
      blockwise._KeyBlocks(0, 1, 1, 0), blockwise._KeyBlocks(1, 30, 10, 1, 2))
  assert plan(12, 31, (rpe_q,)) == (blockwise._KeyBlocks(0, 31, 12, 0),)
  # Rows over 8 blocks wide stay token blocks.
  wide = buckets.get_bucket_geometry('product', 1, 17, 0, 1.9, 3.8, 15.2)
  assert plan(2, 17, ((wide, False, True),)) == (
      blockwise._KeyBlocks(0, 17, 2, 0),)


def _qkv_setup(length_side=4, skip=1, batch=2, heads=2, dim=8, rpe_on='qkv'):
  cfg = irpe_jax.get_rpe_config(ratio=1.9, method='product', mode='ctx',
                                shared_head=False, skip=skip, rpe_on=rpe_on)
  length = skip + length_side * length_side
  x = jax.random.normal(jax.random.key(3), (batch, length, heads * dim))
  return cfg, x, length_side


def _block_dropout_masks(plan, rng, batch, heads):
  """The `(B, H, L, L)` keep mask blockwise attention draws, from its
  per-block draws."""
  length, block_q = plan.query_length, plan.block_q
  keep = np.zeros((batch, heads, length, length), bool)
  for qi in range(-(-length // block_q)):
    # The last block ends at L; its rows and keys before i * block belong
    # to the block before.
    q0 = min(qi * block_q, length - block_q)
    rows = slice(qi * block_q - q0, block_q)
    for blocks in plan.key_blocks:
      for kj in range(-(-blocks.length // blocks.block)):
        k0 = blocks.first + min(kj * blocks.block,
                                blocks.length - blocks.block)
        k_first = blocks.first + kj * blocks.block
        block = np.asarray(blockwise._dropout_keep(
            plan, rng, qi, blocks.index + kj,
            (batch, heads, block_q, blocks.block)))
        keep[:, :, qi * block_q:q0 + block_q, k_first:k0 + blocks.block] = (
            block[:, :, rows, k_first - k0:])
  return keep


@pytest.mark.parametrize('rpe_on, grid_rows', [('qkv', 2), ('qv', 0)])
def test_dropout_is_the_materialized_dropout_with_the_block_masks(
    rpe_on, grid_rows):
  """Forward and backward draw the same per-block masks, on key blocks of
  grid rows (with rpe_k) and of tokens."""
  cfg, x, side = _qkv_setup(rpe_on=rpe_on)
  rate, rng = 0.3, jax.random.key(7)
  batch, length = x.shape[:2]
  block_q, block_k = 8, 8
  geometry = buckets.get_bucket_geometry('product', side, side, 1, 1.9, 3.8,
                                         15.2)
  terms = ((geometry, False, True),) if 'k' in rpe_on else ()
  plan = blockwise._Plan(block_q, (), (), rate, length,
                         blockwise._plan_key_blocks(block_k, length, terms))
  assert plan.key_blocks[-1].grid_rows == grid_rows
  keep = _block_dropout_masks(plan, rng, batch, 2)
  heads, dim = 2, x.shape[-1] // 2
  module = irpe_jax.IRPEAttention(num_heads=heads, rpe_config=cfg,
                                  table_init=jax.nn.initializers.normal(1.0))
  params = module.init(jax.random.key(0), x, height=side, width=side)
  q, k, v = (jax.random.normal(key, (batch, heads, length, dim))
             for key in jax.random.split(jax.random.key(1), 3))
  rpes = irpe_jax.build_rpe(cfg, dim, heads)
  cotangent = jax.random.normal(jax.random.key(2), q.shape)

  def loss(impl, params, q, k, v, dropout=True):
    bound = _bound(dict(zip(RPE_NAMES, rpes)),
                   {name: {'params': params['params'].get(name)}
                    for name in RPE_NAMES})
    kwargs = dict(dropout_rate=rate, dropout_rng=rng) if (
        impl == 'blockwise') else dict(
            dropout=lambda w: jnp.where(keep, w / (1 - rate), 0.0))
    if not dropout:
      kwargs = {}
    out = attention_lib.attention_with_rpe(
        q, k, v, scale=0.3, height=side, width=side, attention_impl=impl,
        block_q=block_q, block_k=block_k, **kwargs, **bound)
    return jnp.sum(out * cotangent), out

  both = jax.jit(lambda *a: [jax.value_and_grad(
      functools.partial(loss, impl), argnums=(0, 1, 2, 3), has_aux=True)(*a)
                             for impl in ('materialized', 'blockwise')])
  want, got = both(params, q, k, v)
  _assert_trees_close(got, want)
  # The dropout is on: without it the output differs.
  (_, plain), _ = jax.value_and_grad(
      lambda *a: loss('materialized', *a, dropout=False), has_aux=True)(
          params, q, k, v)
  assert not np.allclose(plain, want[0][1])


def test_linen_module_dropout_runs_and_is_deterministic_per_key():
  cfg, x, side = _qkv_setup()
  module = irpe_jax.IRPEAttention(num_heads=2, rpe_config=cfg,
                                  dropout_rate=0.5,
                                  attention_impl='blockwise', block_q=8)
  params = module.init(jax.random.key(0), x, height=side, width=side)
  run = jax.jit(lambda seed: module.apply(
      params, x, height=side, width=side, deterministic=False,
      rngs={'dropout': jax.random.key(seed)}))
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  assert not np.allclose(run(1), module.apply(params, x, height=side,
                                              width=side))


def test_nnx_blockwise_equals_linen_blockwise_and_materialized():
  cfg, x, side = _qkv_setup()
  features = x.shape[-1]
  linen = irpe_jax.IRPEAttention(num_heads=2, rpe_config=cfg,
                                 attention_impl='blockwise', block_q=8,
                                 table_init=jax.nn.initializers.normal(1.0))
  variables = linen.init(jax.random.key(0), x, height=side, width=side)
  outs = []
  for impl in ('blockwise', 'materialized'):
    twin = irpe_nnx.IRPEAttention(features, 2, cfg, attention_impl=impl,
                                  block_q=8, rngs=nnx.Rngs(0))
    nnx.update(twin, variables['params'])
    outs.append(twin(x, height=side, width=side))
  want = linen.apply(variables, x, height=side, width=side)
  golden.assert_close(outs[0], want, RTOL, 'nnx blockwise')
  golden.assert_close(outs[1], want, RTOL, 'nnx materialized')


def test_bf16_blockwise_is_as_accurate_as_materialized():
  """bf16 compute, float32 softmax statistics: no worse than materialised."""
  cfg, x, side = _qkv_setup(length_side=5)
  errors = {}
  module = lambda impl, dtype: irpe_jax.IRPEAttention(
      num_heads=2, rpe_config=cfg, attention_impl=impl, block_q=8,
      block_k=8, dtype=dtype, table_init=jax.nn.initializers.normal(1.0))
  params = module('materialized', None).init(jax.random.key(0), x,
                                             height=side, width=side)
  want = module('materialized', None).apply(params, x, height=side,
                                            width=side)
  for impl in ('materialized', 'blockwise'):
    got = module(impl, jnp.bfloat16).apply(params, x, height=side,
                                           width=side)
    assert got.dtype == jnp.bfloat16
    errors[impl] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
  scale = float(jnp.max(jnp.abs(want)))
  assert errors['blockwise'] <= 2 * errors['materialized'] + 2 ** -8 * scale


def test_auto_is_materialized_for_short_and_blockwise_for_long_sequences():
  short = attention_lib.AUTO_BLOCKWISE_MIN_LENGTH['cpu'] - 1
  assert attention_lib.resolve_attention_impl('auto', 197, 'cpu') == (
      'materialized')
  assert attention_lib.resolve_attention_impl('auto', short, 'cpu') == (
      'materialized')
  assert attention_lib.resolve_attention_impl(
      'auto', short + 1, 'cpu') == 'blockwise'
  assert attention_lib.resolve_attention_impl('auto', 197, 'tpu') == (
      'materialized')
  with pytest.raises(ValueError, match="Unknown attention_impl 'flash'"):
    attention_lib.resolve_attention_impl('flash', 10)
  # A DeiT-S length under the default: the weights are formed and sown.
  cfg, x, side = _qkv_setup()
  module = irpe_jax.IRPEAttention(num_heads=2, rpe_config=cfg)
  params = module.init(jax.random.key(0), x, height=side, width=side)
  _, state = module.apply(params, x, height=side, width=side,
                          mutable=['intermediates'])
  assert 'attention_weights' in state['intermediates']


def test_blockwise_errors_name_the_problem():
  q = jnp.ones((1, 1, 5, 4))
  plain = lambda x, *a, **k: x
  with pytest.raises(TypeError, match='needs rpe_k to be an irpe_jax IRPE'):
    attention_lib.attention_with_rpe(q, q, q, scale=1.0, rpe_k=plain,
                                     attention_impl='blockwise')
  with pytest.raises(TypeError, match='pass dropout_rate= and dropout_rng='):
    attention_lib.attention_with_rpe(q, q, q, scale=1.0, dropout=plain,
                                     attention_impl='blockwise')
  with pytest.raises(ValueError, match='needs a dropout_rng'):
    blockwise.blockwise_attention(q, q, q, dropout_rate=0.1)
  with pytest.raises(ValueError, match='block_q'):
    blockwise.blockwise_attention(q, q, q, block_q=0)
  with pytest.raises(ValueError, match='does not broadcast'):
    blockwise.blockwise_attention(q, q, q,
                                  mask=jnp.ones((1, 1, 5, 4), bool))
  # A user's plain callable under 'auto' stays materialised.
  out = attention_lib.attention_with_rpe(q, q, q, scale=1.0,
                                         rpe_k=lambda x, *a, **k: 0.0)
  assert out.shape == q.shape


@pytest.mark.parametrize('rpe_on', ['k', 'qkv'])
def test_blockwise_temporaries_at_4097_tokens_are_below_an_eighth_of_a_map(
    rpe_on):
  """One iRPE attention, B = 1, H = 8, D = 32, fwd+bwd: only compiled."""
  length, side, heads, dim = 4097, 64, 8, 32
  cfg = irpe_jax.get_rpe_config(ratio=1.9, method='product', mode='ctx',
                                shared_head=True, skip=1, rpe_on=rpe_on)
  rpes = dict(zip(RPE_NAMES,
                  irpe_jax.build_rpe(cfg, dim, heads)))
  x = jax.ShapeDtypeStruct((1, heads, length, dim), jnp.float32)
  weights = jax.ShapeDtypeStruct((1, heads, length, length), jnp.float32)
  variables = {name: jax.eval_shape(
      lambda x, m=m: m.init(jax.random.key(0), x, side, side),
      weights if name == 'rpe_v' else x)
               for name, m in rpes.items() if m is not None}

  def loss(variables, q, k, v, cotangent):
    bound = _bound(rpes, variables)
    out = attention_lib.attention_with_rpe(
        q, k, v, scale=dim ** -0.5, height=side, width=side,
        attention_impl='blockwise', **bound)
    return jnp.sum(out * cotangent)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
      variables, x, x, x, x).compile()
  one_map = heads * length * length * 4  # (B, H, L, L) float32
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < one_map / 8, (temp, one_map)


def test_sharded_over_batch_and_heads_and_no_recompilation():
  """Under jit with a (data, model) mesh: equal results, one compile."""
  devices = np.array(jax.devices()[:4]).reshape(2, 2)
  mesh = jax.sharding.Mesh(devices, ('data', 'model'))
  cfg, _, side = _qkv_setup()
  rpes = irpe_jax.build_rpe(cfg, 8, 2,
                            table_init=jax.nn.initializers.normal(1.0))
  batch, heads, length = 2, 2, 17
  q, k, v = (jax.random.normal(key, (batch, heads, length, 8))
             for key in jax.random.split(jax.random.key(4), 3))
  variables = {name: m.init(jax.random.key(5), q if name != 'rpe_v' else
                            jnp.ones((batch, heads, length, length)), side,
                            side)
               for name, m in zip(RPE_NAMES, rpes)}

  def out(variables, q, k, v):
    bound = _bound(dict(zip(RPE_NAMES, rpes)), variables)
    return attention_lib.attention_with_rpe(
        q, k, v, scale=0.3, height=side, width=side,
        attention_impl='blockwise', block_q=8, block_k=8, **bound)

  loss = lambda *a: jnp.sum(jnp.sin(out(*a)))
  step = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)))
  want = step(variables, q, k, v)
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data', 'model'))
  sharded = [jax.device_put(a, sharding) for a in (q, k, v)]
  sharded_step = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)),
                         out_shardings=(None, (sharding,) * 3))
  got = sharded_step(variables, *sharded)
  _assert_trees_close(got, want)
  assert got[1][0].sharding.is_equivalent_to(sharding, 4)
  sharded_step(variables, *[a + 1 for a in sharded])
  assert sharded_step._cache_size() == 1


def test_deit_block_and_detr_encoder_layer_take_the_blockwise_path():
  """The models' `attention_impl` field: equal outputs and gradients."""
  from irpe_jax.models import detr_transformer  # pylint: disable=g-import-not-at-top
  from irpe_jax.models import vit  # pylint: disable=g-import-not-at-top
  deit_cfg = irpe_jax.get_rpe_config(ratio=1.9, method='product', mode='ctx',
                                     shared_head=True, skip=1, rpe_on='qkv')
  detr_cfg = irpe_jax.parse_rpe_string('rpe-2.0-product-ctx-1-k')
  x = jax.random.normal(jax.random.key(0), (2, 1 + 3 * 5, 16))
  src = jax.random.normal(jax.random.key(1), (2, 3 * 5, 16))
  pos = jax.random.normal(jax.random.key(2), src.shape)
  padding = jnp.zeros((2, 3, 5), bool).at[1, :, 3:].set(True).reshape(2, -1)
  init = jax.nn.initializers.normal(1.0)

  def layers(impl):
    return (vit.Block(num_heads=2, rpe_config=deit_cfg, attention_impl=impl),
            detr_transformer.EncoderLayer(
                num_heads=2, dim_feedforward=32, rpe_config=detr_cfg,
                rpe_table_init=init, attention_impl=impl))

  block, layer = layers('materialized')
  variables = (block.init(jax.random.key(3), x, 3, 5, True),
               layer.init(jax.random.key(4), src, pos, padding, 3, 5))

  def loss(impl, variables, x, src):
    block, layer = layers(impl)
    y = block.apply(variables[0], x, 3, 5, True)
    z = layer.apply(variables[1], src, pos, padding, 3, 5)
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.sin(z)), (y, z)

  both = jax.jit(lambda *a: [jax.value_and_grad(
      functools.partial(loss, impl), argnums=(0, 1, 2), has_aux=True)(*a)
                             for impl in ('materialized', 'blockwise')])
  want, got = both(variables, x, src)
  _assert_trees_close(got, want)


def test_nnx_blockwise_dropout_draws_from_the_dropout_stream():
  cfg, x, side = _qkv_setup()
  module = irpe_nnx.IRPEAttention(
      x.shape[-1], 2, cfg, dropout_rate=0.5, attention_impl='blockwise',
      block_q=8, rngs=nnx.Rngs(0, dropout=1))
  first = module(x, height=side, width=side, deterministic=False)
  second = module(x, height=side, width=side, deterministic=False)
  assert not np.allclose(first, second)  # The stream moved on.
  assert not np.allclose(first, module(x, height=side, width=side))
