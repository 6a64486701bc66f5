"""Bucket ids: exact parity with the release, and their invariants."""

import math
import tracemalloc

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

import irpe_jax
from irpe_jax import buckets
import golden

BUCKET_CASES = golden.cases('buckets')
METHODS = ('euc', 'quant', 'product', 'cross_rows', 'cross_cols')
DIRECTED = ('product', 'cross_rows', 'cross_cols')
ratios = st.sampled_from([0.5, 1.0, 1.9, 2.0, 3.7, 20.0, 33.0])
grids = st.tuples(st.integers(1, 7), st.integers(1, 7))


@pytest.mark.parametrize('case,_', BUCKET_CASES,
                         ids=[c['key'] for c, _ in BUCKET_CASES])
def test_bucket_ids_match_release_exactly(case, _):
  ids, num_buckets = irpe_jax.get_bucket_ids_2d(
      case['method'], case['height'], case['width'], case['skip'],
      case['alpha'], case['beta'], case['gamma'])
  np.testing.assert_array_equal(ids, golden.arrays('buckets')[case['key']])
  assert ids.dtype == np.int32
  assert num_buckets == case['num_buckets']


def test_piecewise_index_matches_spec_formula():
  alpha, beta, gamma = 1.9, 3.8, 15.2
  x = np.arange(-40, 41)
  got = irpe_jax.piecewise_index(x, alpha, beta, gamma)
  for xi, gi in zip(x, got):
    if abs(xi) <= alpha:
      expected = xi
    else:
      expected = math.copysign(min(beta, round(
          alpha + math.log(abs(xi) / alpha) / math.log(gamma / alpha) *
          (beta - alpha))), xi)
    assert gi == int(expected), (xi, gi, expected)


@given(st.lists(st.floats(-500, 500, width=32), min_size=1, max_size=50),
       ratios)
def test_piecewise_index_is_odd_monotone_and_saturates(values, ratio):
  x = np.sort(np.asarray(values, np.float32))
  y = irpe_jax.piecewise_index(x, ratio, 2 * ratio, 8 * ratio)
  beta_int = int(2 * ratio)
  assert np.all(np.diff(y) >= 0)
  assert np.all(np.abs(y) <= max(beta_int, int(round(ratio))))
  np.testing.assert_array_equal(
      irpe_jax.piecewise_index(-x, ratio, 2 * ratio, 8 * ratio), -y)


def test_clip_index_clips_to_beta_int():
  x = np.arange(-10, 11)
  np.testing.assert_array_equal(
      irpe_jax.clip_index(x, 1.9, 3.8, 15.2), np.clip(x, -3, 3))


def _offset(height, width, skip, i, j):
  """Row and column offset of query i and key j (spatial tokens)."""
  (ri, ci), (rj, cj) = divmod(i - skip, width), divmod(j - skip, width)
  return ri - rj, ci - cj


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHODS), ratios, grids, st.integers(0, 2))
def test_bucket_ids_depend_only_on_offset(method, ratio, grid, skip):
  height, width = grid
  ids, _ = irpe_jax.get_bucket_ids_2d(method, height, width, skip, ratio,
                                      2 * ratio, 8 * ratio)
  seen = {}
  n = skip + height * width
  for i in range(skip, n):
    for j in range(skip, n):
      seen.setdefault(_offset(height, width, skip, i, j), set()).add(ids[i, j])
  assert all(len(v) == 1 for v in seen.values())


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHODS), ratios, grids, st.integers(0, 2))
def test_bucket_ids_in_range_and_skip_bucket_is_last(method, ratio, grid,
                                                     skip):
  height, width = grid
  ids, num_buckets = irpe_jax.get_bucket_ids_2d(
      method, height, width, skip, ratio, 2 * ratio, 8 * ratio)
  assert ids.shape == (skip + height * width,) * 2
  assert ids.min() >= 0 and ids.max() < num_buckets
  if skip:
    assert np.all(ids[:skip] == num_buckets - 1)
    assert np.all(ids[:, :skip] == num_buckets - 1)
    assert np.all(ids[skip:, skip:] < num_buckets - 1)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(METHODS), ratios, grids)
def test_undirected_symmetric_directed_mirrored(method, ratio, grid):
  ids, num_buckets = irpe_jax.get_bucket_ids_2d(
      method, grid[0], grid[1], 0, ratio, 2 * ratio, 8 * ratio)
  if method in DIRECTED:
    # Swapping query and key negates the offset: the id mirrors about the
    # centre bucket.
    np.testing.assert_array_equal(ids + ids.T, np.full_like(ids,
                                                            num_buckets - 1))
  else:
    np.testing.assert_array_equal(ids, ids.T)


@settings(max_examples=20, deadline=None)
@given(ratios, grids, st.integers(0, 2))
def test_product_is_rows_times_side_plus_cols(ratio, grid, skip):
  args = (grid[0], grid[1], skip, ratio, 2 * ratio, 8 * ratio)
  product, nb = irpe_jax.get_bucket_ids_2d('product', *args)
  rows, _ = irpe_jax.get_bucket_ids_2d('cross_rows', *args)
  cols, _ = irpe_jax.get_bucket_ids_2d('cross_cols', *args)
  side = 2 * int(2 * ratio) + 1
  s = slice(skip, None)
  np.testing.assert_array_equal(product[s, s], rows[s, s] * side + cols[s, s])
  assert nb == side * side + (skip > 0)


def test_bucket_ids_are_cached_and_read_only():
  a, _ = irpe_jax.get_bucket_ids_2d('product', 5, 4, 1, 1.9, 3.8, 15.2)
  b, _ = irpe_jax.get_bucket_ids_2d('product', 5, 4, 1, 1.9, 3.8, 15.2)
  assert a is b
  with pytest.raises(ValueError):
    a[0, 0] = 3


def test_long_method_names_are_aliases():
  for alias, name in (('euclidean', 'euc'), ('quantization', 'quant')):
    a, _ = irpe_jax.get_bucket_ids_2d(alias, 3, 3, 0, 1.9, 3.8, 15.2)
    b, _ = irpe_jax.get_bucket_ids_2d(name, 3, 3, 0, 1.9, 3.8, 15.2)
    assert a is b


@pytest.mark.parametrize('kwargs,match', [
    (dict(method='manhattan'), "Unknown method 'manhattan'"),
    (dict(method='cross'), "'cross' is the pair"),
    (dict(method=2), 'Unknown method id 2'),
    (dict(method=1.0), 'method must be a string or a release METHOD id'),
    (dict(method=True), 'method must be a string'),
    (dict(height=0), 'height must be >= 1, got 0'),
    (dict(width=2.5), 'width must be an int'),
    (dict(skip=-1), 'skip must be >= 0, got -1'),
    (dict(alpha=0.0), 'alpha must be > 0'),
    (dict(alpha=float('nan')), 'alpha must be finite, got nan'),
    (dict(alpha='1.9'), 'alpha must be a real number'),
    (dict(beta=-3.8), r'beta must be >= 1.9, got -3.8'),
    (dict(beta=1.0), r'beta must be >= 1.9, got 1.0'),
    (dict(beta=float('inf')), 'beta must be finite, got inf'),
    (dict(beta=np.float32('nan')), 'beta must be finite, got nan'),
    (dict(gamma=float('nan')), 'gamma must be finite, got nan'),
    (dict(gamma=-1.0), r'gamma must be > 1.9, got -1.0'),
    (dict(gamma=1.9), r'gamma must be > 1.9, got 1.9'),
    (dict(beta=1e6), 'more than int32 ids can index'),
    (dict(index_fn='linear'), "Unknown index_fn 'linear'"),
])
def test_bad_bucket_arguments_raise(kwargs, match):
  args = dict(method='product', height=3, width=3, skip=0, alpha=1.9,
              beta=3.8, gamma=15.2)
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    irpe_jax.get_bucket_ids_2d(**args)


def test_clip_index_ignores_gamma_but_checks_beta():
  ids, nb = irpe_jax.get_bucket_ids_2d('euc', 3, 3, 0, 1.9, 3.8, 0.5,
                                       index_fn='clip')
  assert nb == 7 and ids.min() >= 0
  with pytest.raises(ValueError, match='beta must be >= 0'):
    irpe_jax.clip_index(np.arange(3), 1.9, -1.0, 15.2)


def test_numpy_scalar_arguments_are_accepted():
  ids, nb = irpe_jax.get_bucket_ids_2d(
      'product', np.int64(3), np.int32(4), np.uint8(1), np.float64(1.9),
      np.float64(3.8), np.float64(15.2))
  expected, expected_nb = irpe_jax.get_bucket_ids_2d('product', 3, 4, 1, 1.9,
                                                     3.8, 15.2)
  assert ids is expected and nb == expected_nb
  ids, _ = irpe_jax.get_bucket_ids_2d('euc', 3, 3, 0, np.float32(1.9),
                                      np.float32(3.8), np.float32(15.2))
  assert ids.min() >= 0


@pytest.mark.parametrize('method,name', [
    (0, 'euc'), (1, 'quant'), (3, 'product'), (4, 'cross'),
    (41, 'cross_rows'), (42, 'cross_cols'), (np.int64(41), 'cross_rows'),
    ('EUC', 'euc'), ('Quantization', 'quant'), ('cross', 'cross'),
])
def test_canonical_method_takes_names_aliases_and_release_ids(method, name):
  assert buckets.canonical_method(method) == name


def test_bucket_ids_of_a_large_grid_need_no_large_temporaries():
  # The ids of a 40x40 grid are 10 MB; per-pair int64 offsets would be
  # 41 MB, and the float32 intermediates of g over them as much again.
  tracemalloc.start()
  try:
    ids, _ = irpe_jax.get_bucket_ids_2d('euc', 40, 40, 1, 1.2345, 2.469,
                                        9.876)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert ids.shape == (1601, 1601)
  assert peak < ids.nbytes + 2**20, (peak, ids.nbytes)


def test_num_buckets_without_skip():
  assert buckets.num_buckets_without_skip('product', 3.8) == 49
  assert buckets.num_buckets_without_skip('euc', 3.8) == 7
  assert buckets.num_buckets_without_skip(41, np.float32(0.5)) == 1
  for beta in (-3.8, float('nan')):
    with pytest.raises(ValueError, match='beta must be'):
      buckets.num_buckets_without_skip('product', beta)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHODS), ratios, grids, st.integers(0, 2),
       st.sampled_from(['piecewise', 'clip']))
def test_geometry_rebuilds_the_ids_from_minimal_classes(method, ratio, grid,
                                                        skip, index_fn):
  height, width = grid
  g = buckets.get_bucket_geometry(method, height, width, skip, ratio,
                                  2 * ratio, 8 * ratio, index_fn)
  ids, nb = irpe_jax.get_bucket_ids_2d(method, height, width, skip, ratio,
                                       2 * ratio, 8 * ratio, index_fn)
  assert g.ids is ids and g.num_buckets == nb
  assert (g.height, g.width, g.skip, g.length) == (height, width, skip,
                                                   ids.shape[0])
  ri, ci = np.divmod(np.arange(height * width), width)
  dr = ri[:, None] - ri[None, :] + height - 1
  dc = ci[:, None] - ci[None, :] + width - 1
  np.testing.assert_array_equal(
      ids[skip:, skip:], g.pair_buckets[g.row_class[dr], g.col_class[dc]])
  assert np.all(ids[:skip] == nb - 1) and np.all(ids[:, :skip] == nb - 1)
  # Every class is used, and no two classes could be merged.
  n_rows, n_cols = g.pair_buckets.shape
  assert set(g.row_class) == set(range(n_rows))
  assert set(g.col_class) == set(range(n_cols))
  assert len(np.unique(g.pair_buckets, axis=0)) == n_rows
  assert len(np.unique(g.pair_buckets, axis=1).T) == n_cols


@pytest.mark.parametrize('method,shape', [
    ('product', (7, 7)), ('cross_rows', (7, 1)), ('cross_cols', (1, 7)),
    ('euc', (5, 5)), ('quant', (3, 3))])
def test_geometry_of_the_deit_grid_is_its_14x14_grid(method, shape):
  g = buckets.get_bucket_geometry(method, 14, 14, 1, 1.9, 3.8, 15.2)
  assert (g.height, g.width, g.skip) == (14, 14, 1)
  assert g.pair_buckets.shape == shape
  if method == 'product':  # Class pairs enumerate the buckets in order.
    np.testing.assert_array_equal(g.pair_buckets.ravel(), np.arange(49))
  if method in ('euc', 'quant'):  # Classes of |dr| and |dc|.
    np.testing.assert_array_equal(g.row_class, g.row_class[::-1])
    np.testing.assert_array_equal(g.col_class, g.col_class[::-1])


def test_geometry_is_cached_hashable_and_read_only():
  args = ('quant', 4, 5, 1, 1.9, 3.8, 15.2)
  g = buckets.get_bucket_geometry(*args)
  assert buckets.get_bucket_geometry(*args) is g
  assert hash(g) == hash(buckets.get_bucket_geometry('quantization', 4, 5, 1,
                                                     1.9, 3.8, 15.2))
  assert g != buckets.get_bucket_geometry('quant', 4, 5, 0, 1.9, 3.8, 15.2)
  for array in (g.ids, g.row_class, g.col_class, g.pair_buckets):
    with pytest.raises(ValueError):
      array.flat[0] = 1
