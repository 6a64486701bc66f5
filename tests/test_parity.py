"""Parity with the original PyTorch release on every golden case.

Tolerance: max abs error relative to the largest magnitude of the reference,
1e-5 for float32. The bucket ids are exact (`test_buckets`); what remains is
float32 summation order (XLA's matmuls and reductions against PyTorch's),
a few ulps of the largest value.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import irpe_jax
from irpe_jax import convert
import golden

RTOL = 1e-5
MODULE_CASES = golden.cases('modules')
ATTENTION_CASES = golden.cases('attention')
DETR_CASES = golden.cases('detr_attention')
# Every golden module case runs with the default impl and one of the others,
# in turn, so each impl meets the release on every mode/method/target.
OTHER_IMPLS = tuple(impl for impl in irpe_jax.IMPLS if impl != 'auto')


def _module_for(case, impl):
  cfg = irpe_jax.get_single_rpe_config(
      ratio=case['ratio'], method=case['method'], mode=case['mode'],
      shared_head=case['shared_head'], skip=case['skip'])
  rpe_q, rpe_k, rpe_v = irpe_jax.build_rpe(
      irpe_jax.RPEConfig(rpe_q=cfg if case['rpe_on'] == 'q' else None,
                         rpe_k=cfg if case['rpe_on'] == 'k' else None,
                         rpe_v=cfg if case['rpe_on'] == 'v' else None),
      head_dim=case['head_dim'], num_heads=case['num_heads'], impl=impl)
  return rpe_q or rpe_k or rpe_v


@pytest.mark.parametrize(
    'case,arrays,impls',
    [(c, a, ('auto', OTHER_IMPLS[n % len(OTHER_IMPLS)]))
     for n, (c, a) in enumerate(MODULE_CASES)],
    ids=[c['key'] for c, _ in MODULE_CASES])
def test_module_matches_release(case, arrays, impls):
  modules = [_module_for(case, impl) for impl in impls]
  params = golden.nest({n: jnp.asarray(arrays[f'param/{n}'])
                        for n in case['params']})
  for module in modules:
    assert jax.tree.map(jnp.shape, jax.eval_shape(
        lambda x, module=module: module.init(
            jax.random.key(0), x, case['height'], case['width']),
        arrays['x'])['params']) == jax.tree.map(jnp.shape, params)

  def loss(module, params, x, cotangent):
    y = module.apply({'params': params}, x, case['height'], case['width'])
    return jnp.sum(y * cotangent), y

  # Both impls in one compile (op by op, each case took most of a second);
  # the cotangent an argument, not a constant XLA could fold the backward on.
  results = jax.jit(lambda *args: [jax.value_and_grad(
      functools.partial(loss, module), argnums=(0, 1), has_aux=True)(*args)
                                   for module in modules])(
      params, jnp.asarray(arrays['x']), jnp.asarray(arrays['cotangent']))
  for impl, ((_, y), (grad_params, grad_x)) in zip(impls, results):
    golden.assert_close(y, arrays['y'], RTOL, f'{impl} y')
    golden.assert_close(grad_x, arrays['grad_x'], RTOL, f'{impl} grad_x')
    for name, grad in golden.flatten(grad_params).items():
      golden.assert_close(grad, arrays[f'grad/{name}'], RTOL,
                          f'{impl} grad/{name}')


def torch_attention_params(flat):
  """Release tensor names of an attention block -> IRPEAttention params."""
  renames = {'in_proj_weight': 'qkv.weight', 'in_proj_bias': 'qkv.bias',
             'out_proj.weight': 'proj.weight', 'out_proj.bias': 'proj.bias'}
  return convert.torch_to_flax({renames.get(n, n): v for n, v in flat.items()})


def _assert_grads(grads, arrays, names):
  flat = golden.flatten(grads)
  expected = torch_attention_params(
      {n: arrays[f'grad/{n}'] for n in names})
  for name, value in golden.flatten(expected).items():
    golden.assert_close(flat[name], value, RTOL, name)


@pytest.mark.parametrize('case,arrays', ATTENTION_CASES,
                         ids=[c['key'] for c, _ in ATTENTION_CASES])
def test_attention_matches_release(case, arrays):
  cfg = irpe_jax.get_rpe_config(
      ratio=case['ratio'], method=case['method'], mode=case['mode'],
      shared_head=case['shared_head'], skip=case['skip'],
      rpe_on=case['rpe_on'])
  module = irpe_jax.IRPEAttention(num_heads=case['num_heads'], rpe_config=cfg,
                                  qkv_bias=case['qkv_bias'])
  params = torch_attention_params(
      {n: arrays[f'param/{n}'] for n in case['params']})

  def loss(params, x, cotangent):
    y = module.apply({'params': params}, x, height=case['height'],
                     width=case['width'])
    return jnp.sum(y * cotangent), y

  (_, y), (grads, grad_x) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(
          params, jnp.asarray(arrays['x']), jnp.asarray(arrays['cotangent']))
  golden.assert_close(y, arrays['y'], RTOL, 'y')
  golden.assert_close(grad_x, arrays['grad_x'], RTOL, 'grad_x')
  _assert_grads(grads, arrays, case['params'])


@pytest.mark.parametrize('case,arrays', DETR_CASES,
                         ids=[c['key'] for c, _ in DETR_CASES])
def test_detr_attention_matches_release(case, arrays):
  """Non-square maps, key padding, q = k = src + pos and v = src, skip 0."""
  cfg = irpe_jax.parse_rpe_string(
      f"rpe-{case['ratio']}-{case['method']}-{case['mode']}-"
      f"{int(case['shared_head'])}-{case['rpe_on']}")
  module = irpe_jax.IRPEAttention(num_heads=case['num_heads'], rpe_config=cfg)
  params = torch_attention_params(
      {n: arrays[f'param/{n}'] for n in case['params']})
  batch_first = lambda a: jnp.asarray(a).transpose(1, 0, 2)
  pos = batch_first(arrays['pos_LBE'])
  # The release's mask marks padding with True; ours marks keys to attend.
  mask = ~jnp.asarray(arrays['key_padding_mask'])[:, None, None, :]

  def loss(params, src, cotangent):
    y = module.apply({'params': params}, src + pos, src + pos, src,
                     height=case['height'], width=case['width'], mask=mask)
    return jnp.sum(y * cotangent), y

  (_, y), (grads, grad_src) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(
          params, batch_first(arrays['src_LBE']),
          batch_first(arrays['cotangent']))
  golden.assert_close(y, batch_first(arrays['y_LBE']), RTOL, 'y')
  golden.assert_close(grad_src, batch_first(arrays['grad_src']), RTOL,
                      'grad_src')
  _assert_grads(grads, arrays, case['params'])
