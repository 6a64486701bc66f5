"""Every path lowers for TPU and GPU on this CPU-only machine, and 'auto'
picks its lookup per platform inside one exported function.

`jax.export` lowers for any platform without its hardware: these tests
lower (never compile or run, except on the CPU) the forward and backward of
every iRPE mode, the attention block, a bf16 DeiT-S training step and the
DETR forward for TPU and CUDA. Each module must hold no host callback and
no CPU-only custom call, and where 'auto' runs on TPU the lookups must be
plain matmuls: no `stablehlo.scatter`, no gather of the `(B, H, L, L)` map.

Which ops run on which platform is read from the module itself: a module
lowered for several platforms takes the platform's index as its first
argument and branches on it (`stablehlo.case`); `_ops_on` follows the
branches that index takes, into called functions too.
"""

import functools
import itertools
import re

import jax
from jax import export
from jax.extend import lowering
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import chlo
from jax.extend.mlir.dialects import sdy
from jax.extend.mlir.dialects import stablehlo
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import buckets
from irpe_jax import linen as irpe_linen
from irpe_jax import models
from irpe_jax import ops

ACCELERATORS = ('tpu', 'cuda')
ALL_PLATFORMS = ('cpu', 'tpu', 'cuda')
B, H, D, HEIGHT, WIDTH, SKIP = 1, 2, 4, 3, 4, 1
L = SKIP + HEIGHT * WIDTH
# Custom calls jax emits on every platform (sharding annotations); any other
# target (lapack_*, a host callback, a CPU FFI kernel) fails the check.
PORTABLE_CUSTOM_CALLS = {'Sharding', 'SPMDFullToShardShape',
                         'SPMDShardToFullShape'}
HOST_OR_CPU_ONLY = ('xla_python_cpu_callback', 'xla_ffi_python_cpu_callback',
                    'xla_python_gpu_callback', 'host_callback', 'lapack_',
                    'cpu_')


def _custom_call_targets(text):
  return set(re.findall(r'custom_call\s*@([\w.$-]+)', text)) | set(
      re.findall(r'call_target_name\s*=\s*"([^"]+)"', text))


def _export(fn, *args, platforms=ACCELERATORS):
  """`jax.export` of `jit(fn)` for `platforms`, checked for portability."""
  exported = export.export(jax.jit(fn), platforms=platforms)(*args)
  assert exported.platforms == tuple(platforms)
  text = exported.mlir_module()
  targets = _custom_call_targets(text)
  assert targets <= PORTABLE_CUSTOM_CALLS, targets
  for name in HOST_OR_CPU_ONLY:
    assert name not in text, name
  return exported


def _parse(exported):
  context = ir.Context()
  context.append_dialect_registry(lowering.upstream_dialects)
  context.load_all_available_dialects()
  context.allow_unregistered_dialects = True
  for dialect in (stablehlo, chlo, sdy):
    dialect.register_dialect(context)
  return ir.Module.parse(exported.mlir_module(), context)


def _ops_on(exported, platform):
  """`(op name, result types, operand types)` of the ops `platform` runs.

  Walks `main` with its platform-index argument bound to the platform's
  index; a `stablehlo.case` on a known index contributes only the branch it
  takes. Small i32 constants and the values cases return are tracked, since
  the lowering maps the platform index through a chain of such cases.
  """
  module = _parse(exported)
  funcs = {ir.StringAttr(op.attributes['sym_name']).value: op
           for op in module.body.operations if op.operation.name == 'func.func'}
  found = []

  def walk(block, known):
    for op in block.operations:
      op = op.operation
      results = [str(r.type) for r in op.results]
      if op.name == 'stablehlo.constant' and results == ['tensor<i32>']:
        known[op.results[0]] = int(
            ir.DenseIntElementsAttr(op.attributes['value'])[0])
      elif op.name == 'stablehlo.case' and op.operands[0] in known:
        branch = op.regions[known[op.operands[0]]].blocks[0]
        walk(branch, known)
        returned = list(branch.operations)[-1].operands
        known.update({r: known[v] for r, v in zip(op.results, returned)
                      if v in known})
      elif op.name == 'func.call':
        callee = funcs[ir.FlatSymbolRefAttr(op.attributes['callee']).value]
        body = callee.regions[0].blocks[0]
        walk(body, {arg: known[v] for arg, v in zip(body.arguments,
                                                     op.operands)
                    if v in known})
      else:
        found.append((op.name, results, [str(v.type) for v in op.operands]))
        for region in op.regions:
          for inner in region.blocks:
            walk(inner, known)

  main = funcs['main']
  body = main.regions[0].blocks[0]
  known = {}
  if len(exported.platforms) > 1:
    assert '_platform_index' in str(main.attributes['arg_attrs'][0])
    known[body.arguments[0]] = exported.platforms.index(platform)
  walk(body, known)
  return found


def _named(found, name):
  return [f for f in found if f[0] == f'stablehlo.{name}']


def _touches_map(types, length):
  """Whether a type is the `(.., L, L)` map, or it flattened to `L * L`."""
  for t in types:
    dims = [int(d) for d in re.findall(r'(\d+)x', t)]
    if dims[-2:] == [length, length] or (dims and dims[-1] == length ** 2):
      return True
  return False


def _assert_matmuls_only_on_tpu(exported, length):
  """No scatter, and no gather that reads or writes the `(L, L)` map."""
  found = _ops_on(exported, 'tpu')
  assert not _named(found, 'scatter')
  gathers = [g for g in _named(found, 'gather')
             if _touches_map(g[1] + g[2], length)]
  assert not gathers, gathers


# -- every iRPE mode, forward and backward ----------------------------------

MODES = [(mode, target, method, shared)
         for mode, target in (('bias', 'q'), ('bias', 'k'),
                              ('contextual', 'q'), ('contextual', 'k'),
                              ('contextual', 'v'))
         for method, shared in itertools.product(
             ('euc', 'quant', 'cross', 'product'), (True, False))]


def _module_fwd_bwd(mode, target, method, shared, impl):
  """`(fn, args)`: an iRPE module's output and its VJP, args as shapes."""
  config = irpe_jax.get_single_rpe_config(method=method, mode=mode,
                                          shared_head=shared, skip=SKIP)
  module = irpe_linen.build_single_rpe(config, target != 'v', D, H,
                                       impl=impl)
  x = jax.ShapeDtypeStruct((B, H, L, L if target == 'v' else D), jnp.float32)
  kwargs = dict(height=HEIGHT, width=WIDTH, x_tokens_last=target == 'q')
  params = jax.eval_shape(functools.partial(module.init, **kwargs),
                          jax.random.key(0), x)
  apply = functools.partial(module.apply, **kwargs)

  def fwd_bwd(params, x):
    y, vjp = jax.vjp(apply, params, x)
    return y, vjp(jnp.ones_like(y))

  return fwd_bwd, (params, x)


@pytest.mark.parametrize('mode,target,method,shared', MODES)
def test_every_mode_lowers_and_auto_is_matmuls_on_tpu(mode, target, method,
                                                      shared):
  fn, args = _module_fwd_bwd(mode, target, method, shared, 'auto')
  exported = _export(fn, *args, platforms=ALL_PLATFORMS)
  on_tpu = _ops_on(exported, 'tpu')
  assert not _named(on_tpu, 'scatter') and not _named(on_tpu, 'gather')
  for platform in ('cpu', 'cuda'):
    found = _ops_on(exported, platform)
    # 'factored' (or, for bias, the table take): a gather here.
    assert _named(found, 'gather'), platform
    if mode == 'contextual':  # its gradients emit no scatter-add either
      assert not _named(found, 'scatter'), platform


@pytest.mark.parametrize('impl', [i for i in irpe_jax.IMPLS if i != 'auto'])
@pytest.mark.parametrize('mode,target', [('bias', 'k'), ('contextual', 'q'),
                                         ('contextual', 'v')])
def test_every_impl_lowers_for_accelerators(impl, mode, target):
  # Every impl lowers everywhere: no path needs a platform-specific kernel.
  fn, args = _module_fwd_bwd(mode, target, 'product', True, impl)
  _export(fn, *args)


# -- 'auto' inside one exported function --------------------------------------

def _geometry():
  return buckets.get_bucket_geometry('product', HEIGHT, WIDTH, SKIP,
                                     *irpe_jax.config.piecewise_params(1.9))


def test_auto_picks_per_platform_inside_one_export():
  geometry = _geometry()
  nb = geometry.num_buckets
  fn = functools.partial(ops.contextual_qk_encoding, ids=geometry)

  def fwd_bwd(x, table):
    y, vjp = jax.vjp(fn, x, table)
    return y, vjp(jnp.ones_like(y))

  args = (jax.ShapeDtypeStruct((B, H, L, D), jnp.float32),
          jax.ShapeDtypeStruct((1, D, nb), jnp.float32))
  exported = _export(fwd_bwd, *args, platforms=('cpu', 'tpu'))
  onehot = f'tensor<{L}x{L}x{nb}xi1>'  # the one-hot of the ids, built in-graph
  on_cpu, on_tpu = _ops_on(exported, 'cpu'), _ops_on(exported, 'tpu')
  # CPU: the factored lookup, a gather of the (L * nb) rows into L * L ...
  flat = [g for g in _named(on_cpu, 'gather') if _touches_map(g[1], L)]
  assert flat and not any(onehot in f[1] for f in on_cpu)
  # ... TPU: the one-hot contraction, with no gather or scatter at all.
  assert any(onehot in f[1] for f in on_tpu)
  assert not _named(on_tpu, 'gather') and not _named(on_tpu, 'scatter')


def test_auto_runs_the_factored_branch_of_a_multi_platform_export_on_cpu():
  # A NaN in a bucket no pair of row 0 uses (row 0 is the class token: all
  # its pairs fall in the skip bucket) tells the two lookups apart: the
  # gather never reads it, the one-hot contraction multiplies it by 0.
  geometry = _geometry()
  z = jax.random.normal(jax.random.key(0), (B, H, L, geometry.num_buckets))
  z = z.at[..., 0, 0].set(jnp.nan)
  gather = lambda impl: functools.partial(ops.bucket_gather, ids=geometry,
                                          impl=impl)
  exported = _export(gather('auto'), z, platforms=('cpu', 'tpu'))
  got = exported.call(z)
  np.testing.assert_array_equal(got, jax.jit(gather('factored'))(z))
  assert np.isfinite(got).all()
  assert np.isnan(jax.jit(gather('onehot'))(z)[..., 0, :]).all()


# -- the attention block, a DeiT-S training step, the DETR forward ------------

def test_attention_block_lowers_with_matmul_lookups_on_tpu():
  config = irpe_jax.get_rpe_config(method='product', mode='contextual',
                                   skip=SKIP, rpe_on='qkv')
  block = irpe_jax.IRPEAttention(num_heads=H, rpe_config=config)
  x = jax.ShapeDtypeStruct((B, L, H * D), jnp.float32)
  apply = functools.partial(block.apply, height=HEIGHT, width=WIDTH)
  params = jax.eval_shape(
      functools.partial(block.init, height=HEIGHT, width=WIDTH),
      jax.random.key(0), x)

  def fwd_bwd(params, x):
    y, vjp = jax.vjp(apply, params, x)
    return y, vjp(jnp.ones_like(y))

  _assert_matmuls_only_on_tpu(_export(fwd_bwd, params, x), L)


def test_deit_small_bf16_training_step_lowers():
  from experiments.deit import steps  # pylint: disable=g-import-not-at-top
  model = models.create_model(
      'deit_small_patch16_224_ctx_product_50_shared_qkv', depth=1,
      drop_path_rate=0.1, dtype=jnp.bfloat16)
  recipe = steps.Recipe(peak_lr=1e-3, total_steps=100, warmup_steps=5,
                        warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  state = jax.eval_shape(lambda p, rng: steps.init_state(p, recipe, rng),
                         params, jax.random.key(1))
  batch = {'image': images, 'label': jax.ShapeDtypeStruct((2,), jnp.int32)}
  step = functools.partial(steps.train_step, model=model, recipe=recipe)
  _assert_matmuls_only_on_tpu(_export(step, state, batch), 1 + 14 * 14)


def test_detr_forward_lowers():
  from irpe_jax.models import detr  # pylint: disable=g-import-not-at-top
  model = detr.DETR(enc_layers=2, dec_layers=2, num_queries=10,
                    dim_feedforward=64, hidden_dim=64, num_heads=4)
  images = jax.ShapeDtypeStruct((1, 128, 160, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 128, 160), jnp.bool_)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, mask)
  exported = _export(model.apply, variables, images, mask)
  _assert_matmuls_only_on_tpu(exported, (128 // 32) * (160 // 32))
