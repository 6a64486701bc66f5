"""Tests of a model's expected params and of checking a tree against them."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import models

PACKAGE = pathlib.Path(irpe_jax.__file__).parent
MODEL = models.VisionTransformer(
    img_size=32, patch_size=16, embed_dim=8, depth=1, num_heads=2,
    num_classes=3, rpe_config=irpe_jax.get_rpe_config(
        ratio=1.9, method='product', mode='ctx', shared_head=True, skip=1,
        rpe_on='k'))


def zeros_like_expected(model=MODEL):
  return jax.tree.map(lambda x: np.zeros(x.shape, np.float32),
                      models.expected_params(model))


def test_expected_params_are_shapes_without_values():
  expected = models.expected_params(MODEL)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(expected))
  assert expected['pos_embed'].shape == (1, 1 + 2 * 2, 8)
  assert expected['blocks_0']['attn']['qkv']['kernel'].shape == (8, 24)


def test_check_params_lists_every_mismatch_by_flax_path():
  params = zeros_like_expected()
  del params['head']
  params['blocks_0']['attn']['extra'] = np.zeros(2)
  params['norm']['scale'] = np.zeros(9)
  with pytest.raises(ValueError) as error:
    models.check_params(params, MODEL)
  message = str(error.value)
  assert 'missing (2): head/bias, head/kernel' in message
  assert 'unexpected (1): blocks_0/attn/extra' in message
  assert 'wrong shape (1): norm/scale: checkpoint (9,), model (8,)' in message


def test_check_params_points_to_resampling_for_another_grid():
  params = zeros_like_expected()
  params['pos_embed'] = np.zeros((1, 1 + 3 * 3, 8), np.float32)
  with pytest.raises(ValueError, match='resample_posemb'):
    models.check_params(params, MODEL)


def test_check_params_casts_to_the_model_dtypes_and_keeps_arrays():
  expected = models.expected_params(
      MODEL.clone(param_dtype=jnp.bfloat16))
  params = zeros_like_expected()
  params['head']['bias'] = jnp.ones(3, jnp.float32)
  checked = models.check_params({'params': params}, expected)
  assert {x.dtype for x in jax.tree.leaves(checked)} == {
      jnp.dtype(jnp.bfloat16)}
  assert isinstance(checked['head']['bias'], jax.Array)
  assert isinstance(checked['norm']['scale'], np.ndarray)


def test_check_params_takes_a_custom_naming():
  params = zeros_like_expected()
  del params['cls_token']
  describe = lambda path, shape: ('.'.join(path).upper(), shape[::-1])
  with pytest.raises(ValueError, match=r'missing \(1\): CLS_TOKEN'):
    models.check_params(params, MODEL, describe=describe)


def test_check_params_rejects_a_non_mapping():
  with pytest.raises(TypeError, match='params must be a nested mapping'):
    models.check_params([1, 2], MODEL)


def _imports(path: pathlib.Path):
  """The irpe_jax modules that a file imports."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return {n for n in names if n.startswith('irpe_jax')}


def test_nothing_below_the_converter_imports_it():
  """Layers: ... -> models -> convert; no edge back (no import circle)."""
  for path in PACKAGE.rglob('*.py'):
    if path.name == 'convert.py':
      continue
    assert 'irpe_jax.convert' not in _imports(path), path
  for path in (PACKAGE / 'models').glob('*.py'):
    assert not any(n.startswith('irpe_jax.experiments') or n == 'experiments'
                   for n in _imports(path)), path
