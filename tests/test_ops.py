"""Lookup ops: every impl equals 'naive', gather and scatter are transposes,
the factored scatter is taken wherever the geometry is known, and everything
works under jit, grad, vmap, pmap and sharded jit."""

import functools
import re

import chex
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import buckets
from irpe_jax import ops

FAST_IMPLS = tuple(i for i in irpe_jax.IMPLS if i not in ('naive', 'auto'))
B, H, D, HEIGHT, WIDTH, SKIP = 2, 2, 4, 3, 4, 1
L = SKIP + HEIGHT * WIDTH


def _ids(method='product', ratio=1.9, skip=SKIP, height=HEIGHT, width=WIDTH,
         bare=False):
  """`(ids, num_buckets)`: the geometry the modules pass, or its bare ids."""
  geometry = buckets.get_bucket_geometry(method, height, width, skip, ratio,
                                         2 * ratio, 8 * ratio)
  return (geometry.ids if bare else geometry), geometry.num_buckets


def _array(ids):
  return ids.ids if isinstance(ids, buckets.BucketGeometry) else ids


def _encode(impl, target, x, table, ids):
  """Target 'k' (queries' encoding), 'q' (keys', transposed as the logits
  take it) or 'v'."""
  if target == 'v':
    return ops.contextual_v_encoding(x, table, ids, impl)
  return ops.contextual_qk_encoding(x, table, ids, impl,
                                    x_tokens_last=target == 'q')


def _random_case(seed, target, num_buckets, table_heads, length=L):
  kx, kt = jax.random.split(jax.random.key(seed))
  x_shape = (B, H, length, length if target == 'v' else D)
  t_shape = ((table_heads, num_buckets, D) if target == 'v'
             else (table_heads, D, num_buckets))
  return jax.random.normal(kx, x_shape), jax.random.normal(kt, t_shape)


def _value_and_grads(impl, target, x, table, ids, cotangent):
  def loss(x, table):
    return jnp.sum(_encode(impl, target, x, table, ids) * cotangent)
  y = _encode(impl, target, x, table, ids)
  return y, jax.grad(loss, argnums=(0, 1))(x, table)


def _assert_close_to_scale(actual, desired, err_msg):
  # fp32 sums of many terms differ by order of summation by ~1e-6 of the
  # terms' size, not of the result's: where terms of size ~10 cancel to
  # ~0.4 (seed 43017 below: a shared v table's gradient), a 1e-5 error
  # relative to the result is fp32 rounding, not a wrong lookup. So errors
  # are measured against the largest entry of the reference.
  scale = max(1.0, float(np.abs(desired).max()))
  np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * scale,
                             err_msg=err_msg)


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(['euc', 'quant', 'product', 'cross_rows']),
       ratio=st.sampled_from([1.0, 1.9, 3.0]), target=st.sampled_from('kqv'),
       shared=st.booleans(), seed=st.integers(0, 2**16), bare=st.booleans())
@example(method='euc', ratio=1.0, target='v', shared=True, seed=43017,
         bare=False)
def test_every_impl_equals_naive(method, ratio, target, shared, seed, bare):
  ids, nb = _ids(method, ratio, bare=bare)
  x, table = _random_case(seed, target, nb, 1 if shared else H)
  cotangent = jax.random.normal(jax.random.key(seed + 1),
                                (B, H, L, D if target == 'v' else L))
  # One compile per example: eagerly, each op of each impl compiled on its
  # own.
  results = jax.jit(lambda x, table, cotangent: [
      _value_and_grads(impl, target, x, table, ids, cotangent)
      for impl in ('naive',) + FAST_IMPLS])(x, table, cotangent)
  (ref_y, ref_grads), fast = results[0], results[1:]
  for impl, (y, grads) in zip(FAST_IMPLS, fast):
    _assert_close_to_scale(y, ref_y, impl)
    for g, ref in zip(grads, ref_grads):
      _assert_close_to_scale(g, ref, impl)


@pytest.mark.parametrize('x_tokens_last', [False, True])
@pytest.mark.parametrize('impl', irpe_jax.IMPLS)
def test_bias_impls_agree(impl, x_tokens_last):
  ids, nb = _ids()
  table = jax.random.normal(jax.random.key(0), (H, nb))
  ref = jnp.asarray(np.asarray(table)[:, ids.ids][None])
  if x_tokens_last:
    ref = jnp.swapaxes(ref, -1, -2)
  encode = functools.partial(ops.bias_encoding, ids=ids, impl=impl,
                             x_tokens_last=x_tokens_last)
  chex.assert_trees_all_close(encode(table), ref)
  grad = jax.grad(lambda t: jnp.sum(encode(t) ** 2))(table)
  expected = np.zeros((H, nb), np.float32)
  np.add.at(expected, (slice(None), ids.ids.T if x_tokens_last else ids.ids),
            2 * np.asarray(ref[0]))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bare', [False, True])
@pytest.mark.parametrize('x_tokens_last', [False, True])
@pytest.mark.parametrize('impl', irpe_jax.IMPLS)
def test_gather_and_scatter_are_transposes(impl, x_tokens_last, bare):
  ids, nb = _ids(bare=bare)
  z = jax.random.normal(jax.random.key(1), (B, H, L, nb))
  a = jax.random.normal(jax.random.key(2), (B, H, L, L))
  gather = functools.partial(ops.bucket_gather, ids=ids, num_buckets=nb,
                             impl=impl, x_tokens_last=x_tokens_last)
  scatter = functools.partial(ops.bucket_scatter, ids=ids, num_buckets=nb,
                              x_tokens_last=x_tokens_last)
  gathered = gather(z)
  expected = np.take_along_axis(np.asarray(z), np.broadcast_to(
      _array(ids), (B, H, L, L)), axis=-1)
  np.testing.assert_array_equal(
      gathered, np.swapaxes(expected, -1, -2) if x_tokens_last else expected)
  # <gather(z), a> == <z, scatter(a)>, and the VJP of one is the other.
  np.testing.assert_allclose(jnp.vdot(gathered, a),
                             jnp.vdot(z, scatter(a, impl=impl)), rtol=1e-5)
  _, vjp = jax.vjp(gather, z)
  np.testing.assert_allclose(vjp(a)[0], scatter(a, impl='naive'),
                             rtol=1e-5, atol=1e-5)
  _, vjp = jax.vjp(lambda a: scatter(a, impl=impl), a)
  np.testing.assert_allclose(vjp(z)[0], gathered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('target', 'kq')
@pytest.mark.parametrize('impl', ['factored', 'onehot'])
def test_second_order_gradients(impl, target):
  ids, nb = _ids()
  x, table = _random_case(0, target, nb, 1)

  def hvp(impl):  # reverse-over-reverse: custom VJPs have no forward mode.
    f = lambda x: jnp.sum(jnp.tanh(_encode(impl, target, x, table, ids)))
    return jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), jnp.ones_like(x)))(x)

  np.testing.assert_allclose(hvp(impl), hvp('naive'), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('target', 'kv')
def test_shared_table_equals_broadcast_unshared(target):
  ids, nb = _ids()
  x, shared = _random_case(3, target, nb, 1)
  unshared = jnp.broadcast_to(shared, (H,) + shared.shape[1:])
  np.testing.assert_allclose(_encode('auto', target, x, shared, ids),
                             _encode('auto', target, x, unshared, ids),
                             # Shared tables take a 2-D matmul, unshared a
                             # batched one: summation order differs.
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', irpe_jax.IMPLS)
@pytest.mark.parametrize('target', 'kv')
def test_bfloat16_runs_finite(impl, target):
  ids, nb = _ids()
  x, table = _random_case(4, target, nb, 1)
  x, table = x.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
  y, grads = _value_and_grads(impl, target, x, table, ids,
                              jnp.ones((), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert all(bool(jnp.all(jnp.isfinite(t))) for t in (y,) + grads)
  ref = _encode('naive', target, x.astype(jnp.float32),
                table.astype(jnp.float32), ids)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=0.05, atol=0.1)


# The impls with custom VJPs, whose rules must survive every transformation,
# and 'auto', whose per-platform choice must too.
CUSTOM_VJP_IMPLS = ('factored', 'onehot', 'auto')


class TransformsTest(chex.TestCase):
  """Encodings and their gradients under jax transformations.

  References come from 'naive', which sums in another order: near-zero
  entries need the small absolute tolerance (jax 0.10 on CPU shows 1e-7).
  """

  def setUp(self):
    super().setUp()
    self.ids, self.nb = _ids()
    self.x, self.table = _random_case(5, 'k', self.nb, 1)
    self.expected = _encode('naive', 'k', self.x, self.table, self.ids)

  @chex.variants(with_jit=True, without_jit=True)
  def test_variants(self):
    ids = self.ids

    for impl in CUSTOM_VJP_IMPLS:

      @self.variant
      def f(x, table, impl=impl):
        return _encode(impl, 'k', x, table, ids)

      chex.assert_trees_all_close(f(self.x, self.table), self.expected,
                                  rtol=1e-5, atol=1e-6)

  def test_vmap_over_batch(self):
    for impl in CUSTOM_VJP_IMPLS:
      f = jax.vmap(lambda x, impl=impl: _encode(impl, 'k', x[None], self.table,
                                                self.ids)[0])
      chex.assert_trees_all_close(f(self.x), self.expected, rtol=1e-5,
                                  atol=1e-6)

  # The multi-device tests run on the 4 host CPU devices conftest sets up,
  # also where an accelerator is the default backend (one GPU or TPU chip).

  def test_pmap_over_four_devices(self):
    host = jax.devices('cpu')
    self.assertGreaterEqual(len(host), 4, 'conftest sets 4 host devices')
    x = jnp.broadcast_to(self.x, (4,) + self.x.shape)
    ref = jax.grad(lambda t: jnp.sum(
        _encode('naive', 'k', self.x, t, self.ids) ** 2))(self.table)
    for impl in CUSTOM_VJP_IMPLS:
      g = jax.pmap(jax.grad(lambda x, t, impl=impl: jnp.sum(
          _encode(impl, 'k', x, t, self.ids) ** 2), argnums=1),
                   in_axes=(0, None), devices=host[:4])(
                       x, self.table)
      chex.assert_trees_all_close(g, jnp.broadcast_to(ref, (4,) + ref.shape),
                                  rtol=1e-5, atol=1e-6)

  def test_sharded_jit_and_shard_map(self):
    # Auto axes: with jax's Explicit default even a plain Dense's weight
    # gradient needs an out_sharding.
    mesh = jax.make_mesh((4,), ('data',), devices=jax.devices('cpu')[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.concatenate([self.x] * 2)  # batch 4, one example per device
    x = jax.device_put(x, NamedSharding(mesh, P('data')))
    ref = 2 * jax.grad(lambda t: jnp.sum(
        _encode('naive', 'k', self.x, t, self.ids) ** 2))(self.table)
    for impl in CUSTOM_VJP_IMPLS:
      loss = lambda x, t, impl=impl: jnp.sum(
          _encode(impl, 'k', x, t, self.ids) ** 2)
      grad_sharded = jax.jit(jax.grad(loss, argnums=1))(x, self.table)

      @functools.partial(jax.shard_map, mesh=mesh,
                         in_specs=(P('data'), P()), out_specs=P('data'))
      def encode_per_shard(x, t, impl=impl):
        return _encode(impl, 'k', x, t, self.ids)

      grad_shard_map = jax.jit(jax.grad(
          lambda x, t: jnp.sum(encode_per_shard(x, t) ** 2), argnums=1))
      chex.assert_trees_all_close(grad_sharded, ref, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(grad_shard_map(x, self.table), ref,
                                  rtol=1e-5, atol=1e-6)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P('data'), P()),
                       out_specs=P())
    def table_grad_inside_shard_map(x, t):
      # The gradient of a replicated table, taken inside: summed over devices.
      return jax.grad(lambda t: jnp.sum(
          _encode('factored', 'k', x, t, self.ids) ** 2))(t)

    chex.assert_trees_all_close(table_grad_inside_shard_map(x, self.table),
                                ref, rtol=1e-5, atol=1e-6)


def test_auto_resolves_per_platform():
  assert ops.resolve_impl('auto', 'tpu') == 'onehot'
  for platform in ('cpu', 'cuda', 'rocm', 'gpu'):
    assert ops.resolve_impl('auto', platform) == 'factored', platform
  assert ops.resolve_impl('auto') == ops.resolve_impl('auto',
                                                      jax.default_backend())
  assert ops.resolve_impl('onehot', 'cpu') == 'onehot'
  with pytest.raises(ValueError, match="Unknown impl 'fast'"):
    ops.resolve_impl('fast')
  with pytest.raises(ValueError, match="Unknown impl 'fast'"):
    ops.bucket_gather(jnp.zeros((L, 50)), _ids()[0], impl='fast')


def test_forward_mode_where_there_is_no_custom_vjp():
  ids, nb = _ids()
  x, table = _random_case(6, 'k', nb, 1)
  dx = jnp.ones_like(x)
  _, tangent = jax.jvp(lambda x: _encode('naive', 'k', x, table, ids), (x,),
                       (dx,))
  np.testing.assert_allclose(tangent, _encode('naive', 'k', dx, table, ids),
                             rtol=1e-5, atol=1e-5)
  for custom in CUSTOM_VJP_IMPLS:  # 'auto' holds the factored branch.
    with pytest.raises(TypeError, match='forward-mode autodiff'):
      jax.jvp(lambda x, impl=custom: _encode(impl, 'k', x, table, ids), (x,),
              (dx,))


@settings(max_examples=15, deadline=None)
@given(method=st.sampled_from(['euc', 'quant', 'product', 'cross_rows',
                               'cross_cols']),
       ratio=st.sampled_from([0.5, 1.9, 3.0]),
       grid=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       skip=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_scatter_matches_numpy_on_any_grid(method, ratio, grid, skip, seed):
  geometry, nb = _ids(method, ratio, skip, *grid)
  ids = geometry.ids
  a = np.asarray(jax.random.normal(jax.random.key(seed), (2,) + ids.shape))
  expected = np.zeros((2, ids.shape[0], nb), np.float32)
  for i in range(ids.shape[0]):
    np.add.at(expected[:, i], (slice(None), ids[i]), a[:, i])
  # The transposed scatter reads a[.., i, j] as the pair (j, i).
  a_swapped = np.ascontiguousarray(np.swapaxes(a, -1, -2))
  variants = [(impl, given_ids, x_tokens_last)
              for impl in FAST_IMPLS for given_ids in (geometry, ids)
              for x_tokens_last in (False, True)]
  # One compile per example: eagerly, each op of each variant compiled on
  # its own.
  scatters = jax.jit(lambda a, a_swapped: [
      ops.bucket_scatter(a_swapped if x_tokens_last else a, given_ids, nb,
                         impl, x_tokens_last)
      for impl, given_ids, x_tokens_last in variants])(a, a_swapped)
  for (impl, _, x_tokens_last), got in zip(variants, scatters):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                               err_msg=f'{impl} {x_tokens_last}')


def _lowered_text(impl, target, ids, nb):
  """StableHLO of the encoding and its gradients for input and table."""
  x, table = _random_case(0, target, nb, 1, _array(ids).shape[0])
  fn = functools.partial(_encode, impl, target, ids=ids)
  return jax.jit(lambda x, t: jax.vjp(fn, x, t)[1](fn(x, t))).lower(
      x, table).as_text()


def _has_tensor(text, *dims):
  """Whether `text` holds a tensor whose shape ends in `dims`."""
  return re.search(r'tensor<([0-9]+x)*' + 'x'.join(map(str, dims)) + r'x[a-z]',
                   text) is not None


@pytest.mark.parametrize('skip', [0, 1])
@pytest.mark.parametrize('target', 'qkv')
@pytest.mark.parametrize('method', buckets.TABLE_METHODS)
def test_factored_scatter_is_taken_for_every_method(method, target, skip):
  geometry, nb = _ids(method, skip=skip)
  length, width = geometry.length, geometry.width
  n_rows = geometry.num_row_classes
  # The first factored pass sums into (.., L, nA, w), or transposed (rpe_q's
  # backward) (.., nA, w, L): found where the geometry is given ...
  row_sums = (n_rows, width, length) if target == 'q' else (length, n_rows,
                                                             width)
  text = _lowered_text('factored', target, geometry, nb)
  assert _has_tensor(text, *row_sums)
  assert not _has_tensor(text, length, length, nb)
  # ... and the (L, L, nb) one-hot contraction where only bare ids are.
  text = _lowered_text('factored', target, geometry.ids, nb)
  assert _has_tensor(text, length, length, nb)
  assert not _has_tensor(text, *row_sums)


def test_auto_lowers_to_factored_on_cpu():
  geometry, nb = _ids()
  row_sums = (geometry.length, geometry.num_row_classes, geometry.width)
  for target in 'kv':
    text = _lowered_text('auto', target, geometry, nb)
    assert _has_tensor(text, *row_sums), target  # the factored scatter
    # No one-hot is built (the TPU branch's residuals may still be named).
    assert f'tensor<{L}x{L}x{nb}xi1>' not in text, target


@pytest.mark.parametrize('method', ['product', 'cross'])
def test_modules_pass_the_geometry(method):
  config = irpe_jax.get_single_rpe_config(method=method, skip=1)
  half = 'cross_rows' if method == 'cross' else method
  nb = config.num_buckets
  for target in 'qkv':
    x, table = _random_case(0, target, nb, 1)

    def encode(x, table, target=target):
      return irpe_jax.rpe_lookup(
          x, table, config=config, method=half, for_qk=target != 'v',
          height=HEIGHT, width=WIDTH, impl='factored',
          x_tokens_last=target == 'q')

    text = jax.jit(lambda x, t, f=encode: jax.vjp(f, x, t)[1](f(x, t))).lower(
        x, table).as_text()
    assert not _has_tensor(text, L, L, nb), target


def test_geometry_and_bare_ids_are_checked():
  geometry, nb = _ids()
  z = jnp.zeros((B, H, L, nb))
  with pytest.raises(ValueError, match='num_buckets=7, but the geometry has '
                     '50 buckets'):
    ops.bucket_gather(z, geometry, 7)
  with pytest.raises(ValueError, match='num_buckets is needed with bare ids'):
    ops.bucket_gather(z, geometry.ids)
  with pytest.raises(ValueError, match=r'ids must be a BucketGeometry or '
                     r'square \(L, L\) integer bucket ids'):
    ops.bucket_scatter(jnp.zeros((B, H, L, L)), geometry.ids[:3], nb)
  with pytest.raises(ValueError, match=r'z must have shape \(\.\.\., 13, 50\)'):
    ops.bucket_gather(z[..., :-1], geometry)
  assert ops.bucket_gather(z, geometry).shape == (B, H, L, L)


def test_gather_xla_is_not_a_public_impl():
  assert 'gather_xla' not in irpe_jax.IMPLS
  with pytest.raises(ValueError, match="Unknown impl 'gather_xla'"):
    ops.resolve_impl('gather_xla')
