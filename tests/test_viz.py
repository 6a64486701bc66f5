"""irpe_jax.viz: bucket maps, attention weights and maps, attention by offset.
"""

import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import irpe_jax
from irpe_jax import models
from irpe_jax import viz


def assert_picture(path, min_side=200):
  with Image.open(path) as image:
    assert min(image.size) >= min_side
    colours = image.convert('RGB').getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # not blank.


def test_importing_viz_does_not_import_matplotlib():
  code = ('import sys, irpe_jax.viz; '
          'assert "matplotlib" not in sys.modules, "imported"')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


def test_bucket_map_is_the_query_row_at_each_method_own_ratio():
  ids, num = viz.bucket_map('product', (5, 6), (2, 3), ratio=1.9)
  full, full_num = irpe_jax.get_bucket_ids_2d('product', 5, 6, 0, 1.9, 3.8,
                                              15.2)
  np.testing.assert_array_equal(ids, np.asarray(full)[2 * 6 + 3].reshape(5, 6))
  assert num == full_num
  # At the release's own ratios every method resolves a 15x15 grid finely;
  # at the product's 1.9, euclidean and quantization had only 7 buckets.
  for method in ('euc', 'quant', 'cross_rows', 'cross_cols', 'product'):
    ids, _ = viz.bucket_map(method, (15, 15), (7, 7))
    assert len(np.unique(ids)) >= 11, method
  for method in ('euc', 'quant'):
    ids, _ = viz.bucket_map(method, (15, 15), (7, 7), ratio=1.9)
    assert len(np.unique(ids)) <= 7, method
  with pytest.raises(ValueError, match=r'query=\(5, 0\)'):
    viz.bucket_map('euc', (5, 5), (5, 0))


def test_plot_bucket_maps_writes_a_picture(tmp_path):
  viz.plot_bucket_maps(str(tmp_path / 'b.png'), size=7)
  assert_picture(tmp_path / 'b.png')


@pytest.fixture(scope='module')
def tiny_vit():
  model = models.VisionTransformer(
      img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=8,
      depth=2, num_heads=2, mlp_ratio=1.0,
      rpe_config=irpe_jax.get_rpe_config(skip=1, rpe_on='k'))
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(1), images, train=False)
  return model, variables, images


def test_attention_weights_of_every_block(tiny_vit):
  model, variables, images = tiny_vit
  weights = viz.attention_weights(model, variables, images, train=False)
  assert weights.shape == (2, 3, 2, 17, 17)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  # Block 0's weights are the softmax the model computes: change block 1
  # and block 0 stays.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 2 if 'blocks_1' in jax.tree_util.keystr(p) else x,
      variables['params'])
  again = viz.attention_weights(model, {'params': params}, images,
                                train=False)
  np.testing.assert_allclose(again[0], weights[0], rtol=1e-6)
  assert not np.allclose(again[1], weights[1])


def test_plot_attention_maps_writes_a_picture(tiny_vit, tmp_path):
  model, variables, images = tiny_vit
  weights = viz.attention_weights(model, variables, images,
                                  train=False).mean(2)
  viz.plot_attention_maps(str(tmp_path / 'a.png'),
                          {'model': weights[:, 0], 'again': weights[:, 1]},
                          np.asarray(images[0]), (4, 4), (1, 2))
  assert_picture(tmp_path / 'a.png')
  with pytest.raises(ValueError, match='outside'):
    viz.plot_attention_maps(str(tmp_path / 'x.png'), {'m': weights[:, 0]},
                            np.asarray(images[0]), (4, 4), (4, 0))


def test_attention_by_offset_averages_over_queries():
  rows, cols = 3, 4
  n = rows * cols
  # Each query attends only to itself: all mass at offset (0, 0).
  eye = np.zeros((2, 1 + n, 1 + n))
  eye[:, np.arange(1, n + 1), np.arange(1, n + 1)] = 1.0
  by_offset = viz.attention_by_offset(eye, (rows, cols))
  assert by_offset.shape == (5, 7)
  assert by_offset[2, 3] == 1.0 and by_offset.sum() == 1.0
  # Attention to the right neighbour only: (0, +1), where one exists.
  right = np.zeros((1 + n, 1 + n))
  for q in range(n):
    if q % cols + 1 < cols:
      right[1 + q, 2 + q] = 1.0
  by_offset = viz.attention_by_offset(right, (rows, cols))
  assert by_offset[2, 4] == 1.0 and by_offset.sum() == 1.0


def test_plot_attention_by_offset_writes_a_picture(tmp_path):
  rng = np.random.default_rng(0)
  maps = {f'm{i}': rng.uniform(size=(7, 7)) for i in range(3)}
  viz.plot_attention_by_offset(str(tmp_path / 'o.png'), maps, 'title')
  assert_picture(tmp_path / 'o.png')
