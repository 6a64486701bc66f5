"""The Pallas kernels ('pallas'): slots, lowering for TPU and GPU, fallbacks.

Their equality with the materialised path (golden modules, attention and
DETR cases, hypothesis configs) is in `test_blockwise.py`, which runs every
equality case through both blockwise implementations. Here the kernels run
in Pallas's interpreter; `jax.export` lowers them for 'tpu' (Mosaic) and
'cuda' (Triton) from this CPU.
"""

import functools
import inspect
import re

from flax import nnx
import jax
from jax import export
from jax.sharding import AbstractMesh
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import _kernel_lookup as kl
from irpe_jax import attention as attention_lib
from irpe_jax import blockwise
from irpe_jax import buckets
from irpe_jax import config as config_lib
from irpe_jax import nnx as irpe_nnx
from irpe_jax import kernels as pa
import golden
import test_bf16

RTOL = 1e-5
GEOMETRIES = (('product', 5, 7, 1), ('euc', 6, 4, 0), ('cross_rows', 4, 5, 2),
              ('cross_cols', 3, 6, 1), ('quant', 3, 9, 1))


def _geometry(method, height, width, skip, ratio=1.9):
  return buckets.get_bucket_geometry(method, height, width, skip,
                                     *config_lib.piecewise_params(ratio))


@pytest.mark.parametrize('method,height,width,skip', GEOMETRIES)
def test_slots_give_the_geometry_ids_without_a_table(method, height, width,
                                                     skip):
  g = _geometry(method, height, width, skip)
  lookup = kl.kernel_geometry(g)
  length = g.length + 3  # three tokens of padding
  q_rows, q_cols = kl.token_coords(g, length, True)
  k_rows, k_cols = kl.token_coords(g, length, False)
  dr = jnp.asarray(q_rows[:, None] - k_rows[None])
  dc = jnp.asarray(q_cols[:, None] - k_cols[None])
  spatial = kl.spatial_pairs(dr, g.height)
  for transposed in (False, True):
    slots = np.asarray(lookup.slots(dr, dc, spatial, transposed))
    assert slots.min() >= 0 and slots.max() < lookup.num_slots
    ids = lookup.slot_buckets[slots][:g.length, :g.length]
    np.testing.assert_array_equal(ids, g.ids.T if transposed else g.ids)
    # Padding pairs take the non-spatial slot.
    assert (slots[g.length:] == lookup.num_slots - 1).all()
    assert (slots[:, g.length:] == lookup.num_slots - 1).all()


def test_slot_walks_equal_gathers_and_their_transposes():
  key = jax.random.split(jax.random.key(0), 3)
  values = jax.random.normal(key[0], (6, 16))
  slots = jax.random.randint(key[1], (6, 8), 0, 11)
  a = jax.random.normal(key[2], (6, 8))
  rows = np.take_along_axis(np.asarray(values), np.asarray(slots), 1)
  np.testing.assert_array_equal(kl.lookup_rows(values, slots, 11), rows)
  values_t = jax.random.normal(key[0], (16, 8))
  want = np.asarray(values_t)[np.asarray(slots), np.arange(8)[None]]
  np.testing.assert_array_equal(kl.lookup_cols(values_t, slots, 11), want)
  want = np.zeros((6, 16), np.float32)
  np.add.at(want, (np.arange(6)[:, None], np.asarray(slots)), np.asarray(a))
  np.testing.assert_allclose(kl.scatter_rows(a, slots, 11, 16), want,
                             rtol=1e-6, atol=1e-6)
  want = np.zeros((16, 8), np.float32)
  np.add.at(want, (np.asarray(slots), np.arange(8)[None]), np.asarray(a))
  np.testing.assert_allclose(kl.scatter_cols(a, slots, 11, 16), want,
                             rtol=1e-6, atol=1e-6)


# DeiT-S's grid: 197 tokens (the class token, then 14 x 14).
B, H, D, SIDE, SKIP = 2, 3, 64, 14, 1
L = SKIP + SIDE * SIDE


def _all_terms_loss(backend, q, k, v, z_k, z_q, bias, cotangent):
  """rpe_k, rpe_q and a bias on the logits, rpe_v, and key padding."""
  g = _geometry('product', SIDE, SIDE, SKIP)
  out, sums = pa.pallas_attention(
      q, k, v, logit_terms=[blockwise.LogitTerm(z_k, g, False),
                            blockwise.LogitTerm(z_q, g, True),
                            blockwise.LogitTerm(bias, g, False)],
      value_geometries=[g], mask=(jnp.arange(L) < L - 5)[None, None, None],
      backend=backend)
  return jnp.sum(out * cotangent) + jnp.sum(sums[0] * z_k)


def _export(backend):
  nb = _geometry('product', SIDE, SIDE, SKIP).num_buckets
  shapes = [(B, H, L, D)] * 3 + [(B, H, L, nb)] * 2 + [(H, nb), (B, H, L, D)]
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  step = jax.jit(jax.value_and_grad(
      functools.partial(_all_terms_loss, backend), argnums=tuple(range(6))))
  if backend == 'tpu':
    return export.export(step, platforms=['tpu'])(*args)
  # Triton lowers for a target GPU, which an abstract mesh names.
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  fields = inspect.signature(mesh_lib.AbstractDevice).parameters
  device = mesh_lib.AbstractDevice(**{
      k: v for k, v in (('device_kind', 'NVIDIA H100'), ('num_cores', None),
                        ('num_tpu_cores', None), ('platform', 'cuda'))
      if k in fields})
  mesh = AbstractMesh((1,), ('x',), abstract_device=device)
  # jax.sharding's since jax 0.8; before, only jax._src.mesh's.
  use_mesh = getattr(jax.sharding, 'use_abstract_mesh',
                     mesh_lib.use_abstract_mesh)
  with use_mesh(mesh):
    return export.export(step, platforms=['cuda'], disabled_checks=[
        export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
    ])(*args)


@pytest.mark.parametrize('backend,target', [
    ('tpu', 'tpu_custom_call'), ('gpu', '__gpu$xla.gpu.triton')])
def test_forward_and_backward_lower_to_kernels_with_no_square_array(
    backend, target):
  text = _export(backend).mlir_module()
  calls = re.findall(r'custom_call @([\w$.]+)\(', text)
  # The forward kernel, and the dq and dkv kernels of the backward pass.
  assert calls == [target] * 3, calls
  padded = 256  # L = 197 rounded up to the blocks
  for n in (L, padded):
    assert f'x{n}x{n}x' not in text and f'<{n}x{n}x' not in text


def _modules(impl, **kwargs):
  cfg = irpe_jax.get_rpe_config(ratio=1.9, method='product', mode='ctx',
                                shared_head=False, skip=1, rpe_on='qkv')
  return cfg, irpe_jax.IRPEAttention(
      num_heads=2, rpe_config=cfg, attention_impl=impl, block_q=8,
      block_k=16, table_init=jax.nn.initializers.normal(1.0), **kwargs)


def _x(side=4, skip=1, batch=2, features=16):
  return jax.random.normal(jax.random.key(3),
                           (batch, skip + side * side, features))


def test_nnx_pallas_equals_linen_pallas_and_materialized():
  x = _x()
  cfg, linen = _modules('pallas')
  variables = linen.init(jax.random.key(0), x, height=4, width=4)
  want = irpe_jax.IRPEAttention(
      num_heads=2, rpe_config=cfg, attention_impl='materialized').apply(
          variables, x, height=4, width=4)
  golden.assert_close(linen.apply(variables, x, height=4, width=4), want,
                      RTOL, 'linen pallas')
  twin = irpe_nnx.IRPEAttention(16, 2, cfg, attention_impl='pallas',
                                block_q=8, block_k=16, rngs=nnx.Rngs(0))
  nnx.update(twin, variables['params'])
  golden.assert_close(twin(x, height=4, width=4), want, RTOL, 'nnx pallas')


def test_gradients_are_deterministic():
  """No atomics: two runs give the same bits."""
  x = _x()
  _, module = _modules('pallas')
  variables = module.init(jax.random.key(0), x, height=4, width=4)
  grad = jax.jit(jax.grad(lambda v, x: jnp.sum(
      module.apply(v, x, height=4, width=4) ** 2), argnums=(0, 1)))
  first, second = grad(variables, x), grad(variables, x + 0.0)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


def test_bf16_within_the_materialized_paths_derived_bound():
  """test_bf16's first-order bound of the materialised block holds for the
  kernels, which round less (their logits and lookups are float32)."""
  t = test_bf16
  config = irpe_jax.get_rpe_config(method='product', mode='contextual',
                                   skip=t.SKIP, rpe_on='qkv')
  c = t.H * t.D
  init = jax.nn.initializers.uniform
  inits = dict(kernel_init=init(2 / c), bias_init=init(0.1),
               table_init=init(0.2))
  x = jax.random.uniform(jax.random.key(0), (t.B, t.L, c))
  block = lambda dtype, impl: irpe_jax.IRPEAttention(
      num_heads=t.H, rpe_config=config, dtype=dtype, attention_impl=impl,
      **inits)
  params = block(None, 'materialized').init(
      jax.random.key(1), x, height=t.HEIGHT, width=t.WIDTH)
  want, inter = block(None, 'materialized').apply(
      params, x, height=t.HEIGHT, width=t.WIDTH, mutable=['intermediates'])
  got = block(jnp.bfloat16, 'pallas').apply(params, x, height=t.HEIGHT,
                                            width=t.WIDTH)
  assert got.dtype == jnp.bfloat16
  geometry = _geometry('product', t.HEIGHT, t.WIDTH, t.SKIP)
  weights = inter['intermediates']['attention_weights'][0]
  bound = t._block_bound(params['params'], x, weights, geometry) * 1.05  # pylint: disable=protected-access
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  assert np.all(err <= bound), np.max(err / bound)


def _spy(monkeypatch):
  calls = []
  for module, name in ((pa, 'pallas_attention'),
                       (blockwise, 'blockwise_attention')):
    original = getattr(module, name)

    def spy(*args, original=original, name=name, **kwargs):
      calls.append(name)
      return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
  return calls


def test_auto_takes_the_kernels_only_where_listed_and_they_take_the_case(
    monkeypatch):
  calls = _spy(monkeypatch)
  monkeypatch.setattr(attention_lib, 'AUTO_BLOCKWISE_MIN_LENGTH', {'cpu': 1})
  x = _x(side=3)
  _, module = _modules('auto', dropout_rate=0.5)
  # Traced only: the choice is made at trace time, and the kernels' own
  # tests run them.
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), x, height=3, width=3))
  run = lambda mask=None, train=False: jax.eval_shape(
      lambda variables: module.apply(
          variables, x, height=3, width=3, mask=mask, deterministic=not train,
          rngs={'dropout': jax.random.key(1)}), variables)
  calls.clear()
  run()
  assert calls == ['blockwise_attention']  # No platform is listed yet.
  monkeypatch.setattr(attention_lib, 'AUTO_PALLAS_PLATFORMS',
                      frozenset({jax.default_backend()}))
  calls.clear()
  key_mask = (jnp.arange(x.shape[1]) < 8)[None, None, None]
  run()
  run(mask=key_mask)
  assert calls == ['pallas_attention'] * 2
  # Dropout and masks over queries are not in the kernels: blockwise.
  calls.clear()
  run(train=True)
  run(mask=jnp.tril(jnp.ones((1, 1) + (x.shape[1],) * 2, bool)))
  assert calls == ['blockwise_attention'] * 2


def test_pallas_errors_name_the_case():
  x = _x(side=3)
  _, module = _modules('pallas', dropout_rate=0.5)
  variables = module.init(jax.random.key(0), x, height=3, width=3)
  with pytest.raises(TypeError, match="'pallas' takes no dropout"):
    module.apply(variables, x, height=3, width=3, deterministic=False,
                 rngs={'dropout': jax.random.key(1)})
  with pytest.raises(ValueError, match='a mask that varies over queries'):
    module.apply(variables, x, height=3, width=3,
                 mask=jnp.ones((1, 1) + (x.shape[1],) * 2, bool))
  g = _geometry('product', 3, 3, 1)
  q = jnp.zeros((1, 1, 10, 24))
  z = jnp.zeros((1, 1, 10, g.num_buckets))
  term = [blockwise.LogitTerm(z, g)]
  with pytest.raises(ValueError, match='head size D=24 must be a power'):
    pa.pallas_attention(q, q, q, logit_terms=term, backend='gpu')
  q = jnp.zeros((1, 1, 10, 32))
  with pytest.raises(ValueError, match='block_k must be a multiple of 128'):
    pa.pallas_attention(q, q, q, logit_terms=term, backend='tpu',
                        block_k=64)
  with pytest.raises(ValueError, match="backend must be one of .* 'cuda'"):
    pa.pallas_attention(q, q, q, logit_terms=term, backend='cuda')
  with pytest.raises(ValueError, match='needs at least one iRPE term'):
    pa.pallas_attention(q, q, q)
  other = _geometry('product', 9, 1, 1)
  with pytest.raises(ValueError, match='different token grids'):
    pa.pallas_attention(q, q, q, logit_terms=term, value_geometries=[other])
