"""bfloat16 compute with float32 parameters, within derived error bounds.

bfloat16 keeps 8 significant bits (7 stored, 1 implicit): rounding to it
changes a value by at most `U = 2**-8` of itself. The library computes in
bf16 with float32 parameters, a float32 softmax, and float32 accumulation
of every sum of the lookups (their contractions, the bucket scatters, the
tables' gradients). A result that goes through `R` bf16 roundings and sums
of `n` terms in float32 is then off by at most
`(R * U + n * EPS32) * sum|terms|` (first order), where `sum|terms|` is
the same computation on the absolute values. Each test states its `R` and
`n`; a sum accumulated in bf16 instead would be off by up to
`n * U * sum|terms|`, and `test_table_gradients_*` shows that bound missed
by such a sum. (The attention core's own `q k^T` and `p v` are plain bf16
einsums, which XLA's CPU may sum partly in bf16; the block's bound assumes
float32 sums there, as TPU and GPU matrix units do them.)
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import irpe_jax
from irpe_jax import buckets
from irpe_jax import config as config_lib
from irpe_jax import linen as irpe_linen
from irpe_jax import models
from irpe_jax import nnx as irpe_nnx

U = 2.0 ** -8  # unit roundoff of bf16
EPS32 = 2.0 ** -24  # unit roundoff of float32
B, H, D, HEIGHT, WIDTH, SKIP = 2, 2, 8, 4, 4, 1
L = SKIP + HEIGHT * WIDTH
_table_init = jax.nn.initializers.normal(0.5)

# (mode, target, method) of every module kind; R = bf16 roundings on the
# path: the output (bias); the input, the table, `z = x @ table`
# (contextual q/k); the input, the table, the bucket sums, the output (v);
# plus one where 'cross' adds its two halves. n = longest float32 sum.
MODULES = [('bias', 'q', 'product'), ('bias', 'k', 'cross'),
           ('contextual', 'q', 'product'), ('contextual', 'k', 'cross'),
           ('contextual', 'k', 'euc'), ('contextual', 'v', 'product'),
           ('contextual', 'v', 'cross')]
ROUNDINGS = {'bias': 1, 'q': 3, 'k': 3, 'v': 4}


def _inputs(target, seed=0):
  shape = (B, H, L, L if target == 'v' else D)
  x = jax.random.normal(jax.random.key(seed), shape)
  return jax.nn.softmax(x, axis=-1) if target == 'v' else x


def _linen(config, target, dtype):
  module = irpe_linen.build_single_rpe(config, target != 'v', D, H,
                                       table_init=_table_init, dtype=dtype)
  kwargs = dict(height=HEIGHT, width=WIDTH, x_tokens_last=target == 'q')
  params = jax.jit(functools.partial(module.init, **kwargs))(
      jax.random.key(1), _inputs(target))
  return jax.jit(functools.partial(module.apply, **kwargs)), params


def _nnx(config, target, dtype):
  module = irpe_nnx.build_single_rpe(config, target != 'v', D, H,
                                     rngs=nnx.Rngs(1),
                                     table_init=_table_init, dtype=dtype)
  graph, params = nnx.split(module)
  kwargs = dict(height=HEIGHT, width=WIDTH, x_tokens_last=target == 'q')
  return jax.jit(lambda p, x: nnx.merge(graph, p)(x, **kwargs)), params


@pytest.mark.parametrize('front', [_linen, _nnx], ids=['linen', 'nnx'])
@pytest.mark.parametrize('mode,target,method', MODULES)
def test_module_in_bf16_within_derived_bound(front, mode, target, method):
  config = irpe_jax.get_single_rpe_config(method=method, mode=mode,
                                          shared_head=False, skip=SKIP)
  apply32, params = front(config, target, None)
  apply16, params16 = front(config, target, jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  x = _inputs(target)
  got = apply16(params16, x)
  assert got.dtype == jnp.bfloat16
  want = apply32(params, x)
  # The lookups are bilinear with non-negative coefficients: sum|terms| is
  # the f32 lookup of |x| and |table|.
  terms = np.asarray(apply32(jax.tree.map(jnp.abs, params), jnp.abs(x)))
  rounds = ROUNDINGS['bias' if mode == 'bias' else target] + (
      method == 'cross')
  n = 1 if mode == 'bias' else (L if target == 'v' else D)
  bound = (rounds * U + n * EPS32) * terms * (1 + U)  # (1 + U): 2nd order
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  assert np.all(err <= bound), np.max(err / bound)
  # bf16 really ran: errors reach a good share of one rounding.
  assert np.max(err / terms) > U / 16


# -- the attention block -------------------------------------------------------

def _abs_lookup(geometry, target, x, table):
  """The lookup of |x| and |table| in float64 (sum|terms| of the encoding)."""
  x, table = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(table))
  onehot = (geometry.ids[..., None] ==
            np.arange(geometry.num_buckets)).astype(np.float64)
  if target == 'v':
    return np.einsum('bhij,ijn,hnd->bhid', x, onehot, table)
  out = np.einsum('bhid,hdn,ijn->bhij', x, table, onehot)
  return np.swapaxes(out, -1, -2) if target == 'q' else out


def _block_bound(params, x, weights, geometry):
  """Elementwise first-order bound of |y_bf16 - y_f32| for `IRPEAttention`.

  Propagates through the block the error of every bf16 rounding (each at
  most `U` of the rounded value), bounding values by sums of |terms| (`S`):
  q, k, v = x W + b: 3 roundings (x, W, result); q * scale: 2 more (the
  scale and the product); logits q k^T + rpe_k(q) + rpe_q(k)^T: the
  factors' errors, the tables and `z` (2), the sums (2): at most 10 U of
  their |terms|. The f32 softmax: |dp| <= p (2 max_row |dlogits|), then U
  for rounding p. The output p v + rpe_v(p): |dp| propagated, 5 U of its
  |terms|; the projection: 3 U of its |terms|.
  """
  f64 = lambda a: np.asarray(a, np.float64)
  c = x.shape[-1]
  scale = (c // H) ** -0.5
  heads = lambda a: np.moveaxis(a.reshape(B, L, H, -1), 2, 1)  # (B, H, L, D)
  kernel, bias = f64(params['qkv']['kernel']), f64(params['qkv']['bias'])
  values = f64(x) @ kernel + bias
  sums = np.abs(f64(x)) @ np.abs(kernel) + np.abs(bias)
  q, k, v = (heads(values[..., i * c:(i + 1) * c]) for i in range(3))
  sq, sk, sv = (heads(sums[..., i * c:(i + 1) * c]) for i in range(3))
  table = lambda name: params[name]['lookup_table_weight']
  logit_terms = (scale * np.einsum('bhid,bhjd->bhij', sq, sk) +
                 _abs_lookup(geometry, 'k', scale * sq, table('rpe_k')) +
                 _abs_lookup(geometry, 'q', sk, scale * table('rpe_q')))
  d_logits = 10 * U * logit_terms
  p = f64(weights)
  d_p = p * (d_logits + (p * d_logits).sum(-1, keepdims=True) + U)
  out_terms = p @ sv + _abs_lookup(geometry, 'v', p, table('rpe_v'))
  d_out = (d_p @ sv + _abs_lookup(geometry, 'v', d_p, table('rpe_v')) +
           5 * U * out_terms)
  merge = lambda a: np.moveaxis(a, 1, 2).reshape(B, L, c)
  proj_k, proj_b = f64(params['proj']['kernel']), f64(params['proj']['bias'])
  return (merge(d_out) @ np.abs(proj_k) +
          3 * U * (merge(out_terms) @ np.abs(proj_k) + np.abs(proj_b)))


def test_attention_block_in_bf16_within_derived_bound():
  # Positive inputs and weights: nothing cancels, so sum|terms| is the value
  # itself and the bound is sharp. (It holds for any signs, but cancelling
  # sums make it loose: tens of times the output.)
  config = irpe_jax.get_rpe_config(method='product', mode='contextual',
                                   skip=SKIP, rpe_on='qkv')
  c = H * D
  init = jax.nn.initializers.uniform
  inits = dict(kernel_init=init(2 / c), bias_init=init(0.1),
               table_init=init(0.2))
  x = jax.random.uniform(jax.random.key(0), (B, L, c))
  block = lambda dtype: irpe_jax.IRPEAttention(
      num_heads=H, rpe_config=config, dtype=dtype, **inits)
  apply = lambda dtype, p: jax.jit(functools.partial(
      block(dtype).apply, height=HEIGHT, width=WIDTH,
      mutable=['intermediates']))(p, x)
  params = jax.jit(functools.partial(block(None).init, height=HEIGHT,
                                     width=WIDTH))(jax.random.key(1), x)
  want, inter = apply(None, params)
  got, _ = apply(jnp.bfloat16, params)
  assert got.dtype == jnp.bfloat16
  weights = inter['intermediates']['attention_weights'][0]
  geometry = buckets.get_bucket_geometry(
      'product', HEIGHT, WIDTH, SKIP, *config_lib.piecewise_params(1.9))
  # First order, and float32 sums of at most L terms: 5% covers the rest.
  bound = _block_bound(params['params'], x, weights, geometry) * 1.05
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  assert np.all(err <= bound), np.max(err / bound)
  assert np.max(bound / np.abs(want)) < 48 * U  # a sharp bound ...
  assert np.max(err / bound) > 0.02  # ... that bf16 comes close to


# -- training ---------------------------------------------------------------

def test_small_deit_trains_in_bf16():
  from experiments.deit import steps  # pylint: disable=g-import-not-at-top
  model = models.create_model(
      'deit_tiny_patch16_224_ctx_product_50_shared_k', img_size=32,
      patch_size=8, depth=1, num_classes=10, dtype=jnp.bfloat16,
      rpe_config=irpe_jax.get_rpe_config(skip=1, rpe_on='qkv'))
  recipe = steps.Recipe(peak_lr=1e-3, total_steps=100, warmup_steps=0,
                        warmup_lr=1e-3, min_lr=1e-3, weight_decay=0.05)
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  params = jax.jit(model.init)(jax.random.key(1), images[:1])['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  state = jax.jit(lambda p, rng: steps.init_state(p, recipe, rng))(
      params, jax.random.key(2))
  step = jax.jit(functools.partial(steps.train_step, model=model,
                                   recipe=recipe))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and int(state['nonfinite_steps']) == 0
  assert losses[-1] < 0.7 * losses[0], losses
  grads = jax.eval_shape(jax.grad(
      lambda p: optax.softmax_cross_entropy_with_integer_labels(
          model.apply({'params': p}, images).astype(jnp.float32),
          batch['label']).mean()), state['params'])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


# -- float32 accumulation of the tables' gradients -----------------------------

LONG_HEIGHT = LONG_WIDTH = 32
LONG_L = 1 + LONG_HEIGHT * LONG_WIDTH  # 1025 tokens, DeiT's class token
LONG_D = 4


def _long_case(target, seed=0):
  """Positive bf16 inputs and cotangent (every term of the sums adds up)."""
  geometry = buckets.get_bucket_geometry(
      'product', LONG_HEIGHT, LONG_WIDTH, 1, *config_lib.piecewise_params(1.9))
  keys = jax.random.split(jax.random.key(seed), 3)
  nb = geometry.num_buckets
  x_shape = (1, H, LONG_L, LONG_L if target == 'v' else LONG_D)
  out_shape = (1, H, LONG_L, LONG_D if target == 'v' else LONG_L)
  t_shape = (1, nb, LONG_D) if target == 'v' else (1, LONG_D, nb)
  if target == 'bias':
    x_shape, out_shape, t_shape = None, (1, 1, LONG_L, LONG_L), (1, nb)
  uniform = lambda k, s: jax.random.uniform(k, s, minval=0.5, maxval=1.0)
  x = None if x_shape is None else uniform(keys[0], x_shape).astype(
      jnp.bfloat16)
  return geometry, x, uniform(keys[1], t_shape), uniform(
      keys[2], out_shape).astype(jnp.bfloat16)


def _table_grad(target, impl, x, table, cotangent):
  """The float32 table's gradient through `rpe_lookup`, as modules call it."""
  config = irpe_jax.get_single_rpe_config(
      mode='bias' if target == 'bias' else 'contextual', skip=1)
  if x is None:  # bias: the input only gives the dtype
    x = jnp.zeros((1, H, LONG_L, LONG_D), jnp.bfloat16)
  encode = functools.partial(
      irpe_jax.rpe_lookup, x, config=config, method='product',
      for_qk=target != 'v', height=LONG_HEIGHT, width=LONG_WIDTH, impl=impl)
  _, vjp = jax.vjp(encode, table)
  return np.asarray(jax.jit(vjp)(cotangent)[0], np.float64)


def _bucket_sums(a, geometry):
  """`s[.., i, t] = sum_{j : ids[i, j] = t} a[.., i, j]` in float64."""
  nb = geometry.num_buckets
  rows = np.arange(LONG_L)[:, None] * nb + geometry.ids
  a = np.asarray(a, np.float64).reshape(-1, LONG_L * LONG_L)
  return np.stack([np.bincount(rows.ravel(), r, LONG_L * nb) for r in a]
                  ).reshape(a.shape[:-1] + (LONG_L, nb))


def _exact_terms(geometry, target, x, cotangent):
  """The terms of the table's gradient, in float64 from the bf16 inputs.

  `(N, ...)` with the gradient `terms.sum(0)`: for bias the bucket sums of
  each row of the cotangent; for q/k `x[r, d] * scatter(cotangent)[r, t]`
  and for v `scatter(a)[r, t] * cotangent[r, d]`, over the B * H * L rows.
  """
  g = np.asarray(cotangent, np.float64)
  if target == 'bias':
    return _bucket_sums(g, geometry)[0]
  x = np.asarray(x, np.float64)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  if target == 'v':
    s = rows(_bucket_sums(x, geometry))
    return s[:, :, None] * rows(g)[:, None, :]
  return rows(x)[:, :, None] * rows(_bucket_sums(g, geometry))[:, None, :]


@pytest.mark.parametrize('impl', ['auto', 'onehot', 'naive'])
@pytest.mark.parametrize('target', ['k', 'v', 'bias'])
def test_table_gradients_accumulate_in_float32(target, impl):
  geometry, x, table, cotangent = _long_case(target)
  got = _table_grad(target, impl, x, table, cotangent)
  terms = _exact_terms(geometry, target, x, cotangent)
  want = terms.sum(0)[None]
  if target == 'bias':  # float32 sums over the (L, L) map, no rounding
    rounds, n = 0, LONG_L ** 2
  elif impl == 'naive':  # the (L, L) weights' gradient rounded, then summed
    rounds, n = 1, H * LONG_L ** 2
  else:  # the bucket sums rounded, then B * H * L rows summed
    rounds, n = 1, LONG_L + terms.shape[0]
  bound = (rounds * U + n * EPS32) * want
  err = np.abs(got - want)
  assert np.all(err <= bound), np.max(err / bound)
  # Kept in float32: not rounded to bf16 on the way back to the table.
  assert np.mean(got == got.astype(ml_dtypes.bfloat16)) < 0.5
  if impl == 'auto':
    # The same terms summed in bf16, one after the other, miss the bound:
    # past 256 times a term, adding one more changes nothing.
    in_bf16 = np.add.accumulate(terms.astype(ml_dtypes.bfloat16), axis=0)
    assert np.any(np.abs(in_bf16[-1][None].astype(np.float64) - want) >
                  bound)
