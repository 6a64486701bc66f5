"""DETR with iRPE against the release: whole model, encoder layer, checkpoints.

The golden `detr_model` holds no weights: each tensor of the release's state
dict is drawn from its name and a seed (`release_tensor`), written to a
`.pth` as the release saves it and loaded with `convert`, so the parity test
runs the very path a user's checkpoint takes. Whole-model tolerance: 1e-4
of the largest reference value (float32 summation order over ResNet-50 and
12 transformer layers); the encoder layer: 1e-5.

CI cost: the full model is compiled once, at the golden's padded 160x224
batch (`FORWARD`, shared by every test that runs it).
"""

import functools
import json
import re
import struct
import zipfile
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from experiments.benchmarks import bench_detr_memory as bench_memory
from experiments.detr import predict
from experiments.detr import preprocess
import irpe_jax
from irpe_jax import convert
from irpe_jax import models
from irpe_jax.models import detr
from irpe_jax.models import detr_postprocess
from irpe_jax.models import detr_transformer
import golden

RTOL_MODEL = 1e-4
RTOL_LAYER = 1e-5
CASE, ARRAYS = golden.cases('detr_model')[0]
ATTENTION_CASES = golden.cases('detr_attention')
CHECKPOINT_SHAPES = json.loads(
    (golden.GOLDEN_DIR / 'detr_checkpoint_shapes.json').read_text())
MODEL = models.DETR(
    num_classes=CASE['num_classes'], num_queries=CASE['num_queries'],
    enc_rpe2d=CASE['enc_rpe2d'], hidden_dim=CASE['hidden_dim'],
    num_heads=CASE['nheads'], enc_layers=CASE['enc_layers'],
    dec_layers=CASE['dec_layers'], dim_feedforward=CASE['dim_feedforward'],
    aux_loss=CASE['aux_loss'])
TRACED_SHAPES = []


def _apply(variables, images, pixel_mask):
  TRACED_SHAPES.append(images.shape)
  return MODEL.apply(variables, images, pixel_mask,
                     mutable=['intermediates'])


FORWARD = jax.jit(_apply)


def release_tensor(name: str, shape, seed: int) -> np.ndarray:
  """A tensor of the release's state dict, drawn as the golden's were."""
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  batch_norm = '.bn' in name or 'downsample.1.' in name
  if name.endswith('running_var'):
    x = rng.uniform(0.5, 1.5, shape)
  elif name.endswith('running_mean'):
    x = rng.normal(0, 0.1, shape)
  elif batch_norm and name.endswith('weight'):
    x = rng.uniform(0.2, 0.6, shape)
  elif batch_norm and name.endswith('bias'):
    x = rng.normal(0, 0.1, shape)
  elif 'norm' in name and name.endswith('weight'):
    x = rng.uniform(0.8, 1.2, shape)
  elif 'lookup_table' in name:
    x = rng.normal(0, 0.2, shape)
  elif len(shape) >= 2:
    x = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
  else:
    x = rng.normal(0, 0.05, shape)
  return np.asarray(x, np.float32)


def write_pth(path, state) -> str:
  """`torch.save({'model': state})` of float32 arrays, without torch.

  The zip layout and protocol-2 pickle that `torch.save` writes: each
  tensor is `torch._utils._rebuild_tensor_v2` of a `FloatStorage` stored as
  `archive/data/KEY`.
  """
  text = lambda s: b'X' + struct.pack('<I', len(s.encode())) + s.encode()
  integer = lambda n: b'J' + struct.pack('<i', n)
  tup = lambda *items: b'(' + b''.join(items) + b't'
  name = lambda module, attr: f'c{module}\n{attr}\n'.encode()
  items, storages = [], {}
  for key, (tensor_name, value) in enumerate(state.items()):
    value = np.ascontiguousarray(value, np.float32)
    storages[str(key)] = value.tobytes()
    strides = tuple(s // 4 for s in value.strides)
    storage = tup(text('storage'), name('torch', 'FloatStorage'),
                  text(str(key)), text('cpu'), integer(value.size)) + b'Q'
    items.append(text(tensor_name) + name('torch._utils', '_rebuild_tensor_v2')
                 + tup(storage, integer(0), tup(*map(integer, value.shape)),
                       tup(*map(integer, strides)), b'\x89',
                       name('collections', 'OrderedDict') + b')R') + b'R')
  payload = b'\x80\x02}' + text('model') + b'}(' + b''.join(items) + b'us.'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', payload)
    archive.writestr('archive/byteorder', 'little')
    for key, data in storages.items():
      archive.writestr(f'archive/data/{key}', data)
    archive.writestr('archive/version', '3\n')
  return str(path)


@pytest.fixture(scope='module')
def release_state():
  return {name: release_tensor(name, tuple(shape), CASE['seed'])
          for name, shape in CASE['state_dict_names_shapes'].items()}


@pytest.fixture(scope='module')
def release_pth(release_state, tmp_path_factory):
  return write_pth(tmp_path_factory.mktemp('detr') / 'detr.pth',
                   release_state)


@pytest.fixture(scope='module')
def variables(release_pth):
  """The drawn weights, through a `.pth` written as the release saves it."""
  return convert.load_torch_checkpoint(release_pth, MODEL)


def golden_inputs():
  return (jnp.asarray(ARRAYS['images_nchw'].transpose(0, 2, 3, 1)),
          jnp.asarray(ARRAYS['pixel_mask']))


@pytest.fixture(scope='module')
def golden_run(variables):
  return FORWARD(variables, *golden_inputs())


# The whole model.


def _nhwc(x):
  return x.transpose(0, 2, 3, 1)


def _batch_first(x):
  return x.transpose(1, 0, 2)


INTERMEDIATES = {
    'backbone_features': ('backbone_features_nchw', _nhwc),
    'encoder_memory': ('encoder_memory_LBE', _batch_first),
}


@pytest.mark.parametrize('name', sorted(INTERMEDIATES))
def test_intermediates_match_release(golden_run, name):
  _, state = golden_run
  key, layout = INTERMEDIATES[name]
  golden.assert_close(state['intermediates'][name][0], layout(ARRAYS[key]),
                      RTOL_MODEL, name)


@pytest.mark.parametrize('output', ['pred_logits', 'pred_boxes'])
@pytest.mark.parametrize('layer', ['final'] + [f'aux{j}' for j in range(5)])
def test_predictions_match_release(golden_run, layer, output):
  out, _ = golden_run
  if layer == 'final':
    actual, expected = out[output], ARRAYS[output]
  else:
    actual = out['aux_outputs'][int(layer[3:])][output]
    expected = ARRAYS[f'{layer}/{output}']
  golden.assert_close(actual, expected, RTOL_MODEL, f'{layer}/{output}')


def test_post_processing_matches_release(golden_run):
  out, _ = golden_run
  post = jax.jit(models.post_process)(
      {k: out[k] for k in ('pred_logits', 'pred_boxes')},
      jnp.asarray(CASE['orig_target_sizes_hw']))
  for b in range(len(CASE['orig_target_sizes_hw'])):
    golden.assert_close(post['scores'][b], ARRAYS[f'post{b}/scores'],
                        RTOL_MODEL, 'scores')
    np.testing.assert_array_equal(post['labels'][b], ARRAYS[f'post{b}/labels'])
    golden.assert_close(post['boxes'][b], ARRAYS[f'post{b}/boxes_xyxy'],
                        RTOL_MODEL, 'boxes')


def test_traces_once_per_padded_shape(variables, golden_run):
  """Image sizes inside one padded shape change the mask, not the program."""
  images, mask = golden_inputs()
  traced = len(TRACED_SHAPES)
  other_mask = mask.at[0, 100:].set(True).at[1, :, 64:].set(True)
  out, _ = FORWARD(variables, images, other_mask)
  assert len(TRACED_SHAPES) == traced
  assert not np.allclose(out['pred_boxes'], golden_run[0]['pred_boxes'])
  # Another padded shape traces (once) without being compiled here.
  shapes = (jax.ShapeDtypeStruct((2, 96, 128, 3), jnp.float32),
            jax.ShapeDtypeStruct((2, 96, 128), jnp.bool_))
  FORWARD.lower(variables, *shapes)
  FORWARD.lower(variables, *shapes)
  assert TRACED_SHAPES[traced:] == [(2, 96, 128, 3)]


def test_nnx_bridge_gives_the_linen_outputs(variables, golden_run):
  nnx_model = models.to_nnx(MODEL, variables)
  images, mask = golden_inputs()
  out = flax.nnx.jit(lambda m, x, mask: m(x, mask))(nnx_model, images, mask)
  for name in ('pred_logits', 'pred_boxes'):
    golden.assert_close(out[name], golden_run[0][name], RTOL_LAYER, name)
  state = flax.nnx.to_pure_dict(flax.nnx.state(nnx_model,
                                               flax.nnx.BatchStat))
  np.testing.assert_array_equal(
      state['backbone_0']['body']['bn1']['var'],
      variables['batch_stats']['backbone_0']['body']['bn1']['var'])


# The encoder self-attention of the release, inside a whole encoder layer.


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


@pytest.mark.parametrize('case,arrays', ATTENTION_CASES,
                         ids=[c['key'] for c, _ in ATTENTION_CASES])
def test_release_attention_inside_an_encoder_layer(case, arrays):
  """The layer's `self_attn` is the release's, and the rest is post-norm."""
  cfg = irpe_jax.parse_rpe_string(
      f"rpe-{case['ratio']}-{case['method']}-{case['mode']}-"
      f"{int(case['shared_head'])}-{case['rpe_on']}")
  layer = detr_transformer.EncoderLayer(
      num_heads=case['num_heads'], dim_feedforward=16, rpe_config=cfg)
  rng = np.random.default_rng(0)
  dim = case['embed_dim']
  state = {f'self_attn.{n}': arrays[f'param/{n}'] for n in case['params']}
  state.update({
      'linear1.weight': rng.normal(0, 0.3, (16, dim)),
      'linear1.bias': rng.normal(0, 0.1, (16,)),
      'linear2.weight': rng.normal(0, 0.3, (dim, 16)),
      'linear2.bias': rng.normal(0, 0.1, (dim,)),
      'norm1.weight': rng.uniform(0.8, 1.2, (dim,)),
      'norm1.bias': rng.normal(0, 0.1, (dim,)),
      'norm2.weight': rng.uniform(0.8, 1.2, (dim,)),
      'norm2.bias': rng.normal(0, 0.1, (dim,)),
  })
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  params = convert.torch_to_flax(state)
  src = jnp.asarray(_batch_first(arrays['src_LBE']))
  pos = jnp.asarray(_batch_first(arrays['pos_LBE']))
  padding = jnp.asarray(arrays['key_padding_mask'])
  cotangent = _batch_first(arrays['cotangent'])

  def loss(params, src):
    out, inter = layer.apply(
        {'params': params}, src, pos, padding, case['height'], case['width'],
        capture_intermediates=lambda m, _: m.name == 'self_attn',
        mutable=['intermediates'])
    attn = inter['intermediates']['self_attn']['__call__'][0]
    return jnp.sum(attn * cotangent), (attn, out)

  (_, (attn, out)), (grads, grad_src) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(params, src)
  golden.assert_close(attn, _batch_first(arrays['y_LBE']), RTOL_LAYER, 'y')
  golden.assert_close(grad_src, _batch_first(arrays['grad_src']), RTOL_LAYER,
                      'grad_src')
  expected_grads = convert.torch_to_flax(
      {f'self_attn.{n}': arrays[f'grad/{n}'] for n in case['params']})
  for name, value in golden.flatten(expected_grads).items():
    golden.assert_close(golden.flatten(grads)[name], value, RTOL_LAYER, name)
  # What the layer makes of the release's attention output.
  x = _layer_norm(np.asarray(src) + _batch_first(arrays['y_LBE']),
                  state['norm1.weight'], state['norm1.bias'])
  hidden = np.maximum(x @ state['linear1.weight'].T + state['linear1.bias'], 0)
  x = _layer_norm(x + hidden @ state['linear2.weight'].T
                  + state['linear2.bias'], state['norm2.weight'],
                  state['norm2.bias'])
  golden.assert_close(out, x, RTOL_LAYER, 'layer output')


# Checkpoints.


@pytest.mark.parametrize('enc_rpe2d', sorted(CHECKPOINT_SHAPES))
def test_names_and_shapes_are_the_release_checkpoints(enc_rpe2d):
  model = models.DETR(enc_rpe2d=enc_rpe2d)
  expected = expected_variables(model)
  state = convert.flax_to_torch(expected)
  assert {k: list(v.shape) for k, v in state.items()} == (
      CHECKPOINT_SHAPES[enc_rpe2d])
  back = convert.torch_to_flax(state, model)
  assert jax.tree.map(lambda x: x.shape, back) == jax.tree.map(
      lambda x: x.shape, expected)


def test_frozen_batch_norm_is_not_a_param(variables):
  body = variables['batch_stats']['backbone_0']['body']
  assert set(body['layer1_0']['downsample_1']) == {'scale', 'bias', 'mean',
                                                   'var'}
  assert not any('bn' in '/'.join(path) or 'downsample_1' in '/'.join(path)
                 for path in flax.traverse_util.flatten_dict(
                     variables['params']))


def test_flax_to_torch_writes_the_release_state_back(release_state, variables):
  back = convert.flax_to_torch(variables)
  assert sorted(back) == sorted(release_state)
  for name, value in release_state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_command_line_converts_a_detr_checkpoint(release_pth, variables,
                                                 tmp_path, capsys):
  out = tmp_path / 'detr.msgpack'
  assert convert.main([release_pth, str(out), '--detr',
                       CASE['enc_rpe2d']]) == 0
  assert f'checked against DETR {CASE["enc_rpe2d"]}' in capsys.readouterr().out
  loaded = convert.load_params(str(out), MODEL)
  assert set(loaded) == {'params', 'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  assert convert.main([release_pth, str(tmp_path / 'plain.msgpack'),
                       '--detr', '']) == 1
  assert 'unexpected (6)' in capsys.readouterr().err


@functools.lru_cache(maxsize=None)
def expected_variables(model=MODEL):
  return models.expected_variables(model)


def _release_shapes(model=MODEL):
  return convert.flax_to_torch(expected_variables(model))


def test_a_misfit_checkpoint_names_every_problem():
  state = _release_shapes()
  del state['transformer.encoder.layers.3.self_attn.rpe_k.lookup_table_weight']
  del state['backbone.0.body.layer2.1.bn2.running_var']
  state['transformer.extra.weight'] = jax.ShapeDtypeStruct((2, 2), jnp.float32)
  state['query_embed.weight'] = jax.ShapeDtypeStruct((50, 256), jnp.float32)
  with pytest.raises(ValueError) as error:
    convert.torch_to_flax(state, MODEL)
  message = str(error.value)
  assert ('missing (2): backbone.0.body.layer2.1.bn2.running_var, '
          'transformer.encoder.layers.3.self_attn.rpe_k.lookup_table_weight'
          in message)
  assert 'unexpected (1): transformer.extra.weight' in message
  assert 'query_embed.weight: checkpoint (50, 256), model (100, 256)' in message


def _torchvision_resnet50():
  """torchvision's ResNet-50 state dict, as shapes."""
  prefix = 'backbone.0.body.'
  state = {k[len(prefix):]: v for k, v in _release_shapes().items()
           if k.startswith(prefix)}
  for name in [k for k in state if k.endswith('running_var')]:
    state[name.replace('running_var', 'num_batches_tracked')] = (
        jax.ShapeDtypeStruct((), jnp.int64))
  state['fc.weight'] = jax.ShapeDtypeStruct((1000, 2048), jnp.float32)
  state['fc.bias'] = jax.ShapeDtypeStruct((1000,), jnp.float32)
  return state


def test_torchvision_resnet_loads_into_the_backbone_only():
  backbone = convert.torch_to_flax(_torchvision_resnet50(), MODEL)
  expected = expected_variables()
  for collection in ('params', 'batch_stats'):
    assert set(backbone[collection]) == {'backbone_0'}
    assert jax.tree.map(lambda x: x.shape, backbone[collection]) == (
        jax.tree.map(lambda x: x.shape,
                     {'backbone_0': expected[collection]['backbone_0']}))
  merged = detr.replace_backbone(MODEL, expected, backbone)
  assert jax.tree.structure(merged) == jax.tree.structure(expected)
  flat = flax.traverse_util.flatten_dict
  for path, value in flat(merged).items():
    source = backbone if path[1] == 'backbone_0' else expected
    assert value is flat(source)[path]
  with pytest.raises(ValueError, match='backbone does not fit'):
    detr.replace_backbone(MODEL, expected, {'params': backbone['params']})
  initialised = jax.eval_shape(
      lambda b: detr.init_variables(MODEL, jax.random.key(0), b), backbone)
  assert jax.tree.map(lambda x: x.shape, initialised) == jax.tree.map(
      lambda x: x.shape, expected)


def test_an_incomplete_resnet_is_named_as_in_its_file():
  state = _torchvision_resnet50()
  del state['layer4.2.conv3.weight']
  with pytest.raises(ValueError,
                     match=r'missing \(1\): layer4\.2\.conv3\.weight$'):
    convert.torch_to_flax(state, MODEL)


# Configuration.


@pytest.mark.parametrize('enc_rpe2d,buckets', [
    ('rpe-1.9-product-ctx-1-k', 49), ('rpe-2.0-product-ctx-1-k', 81),
    ('rpe-2.5-product-ctx-1-k', 121), ('rpe-3.0-product-ctx-1-k', 169)])
def test_release_rpe_strings_give_their_bucket_counts(enc_rpe2d, buckets):
  config = detr.parse_enc_rpe2d(enc_rpe2d)
  assert config.rpe_k.num_buckets == buckets and config.rpe_k.skip == 0
  assert config.rpe_q is None and config.rpe_v is None


def test_empty_rpe_string_is_plain_detr():
  model = models.DETR(enc_rpe2d='')
  names = set(_release_shapes(model))
  with_rpe = set(CHECKPOINT_SHAPES['rpe-2.0-product-ctx-1-k'])
  assert names == {n for n in with_rpe if 'lookup_table' not in n}


@pytest.mark.parametrize('spec', [
    'rpe-2.0-product-ctx-1', 'rpe-two-product-ctx-1-k',
    'rpe-2.0-product-ctx-2-k',
    'rpe-2.0-spiral-ctx-1-k', 'rpe-2.0-product-bias-1-v', 'irpe', '-'])
def test_malformed_rpe_strings_are_named(spec):
  with pytest.raises(ValueError, match=re.escape(f'enc_rpe2d={spec!r}')):
    detr.parse_enc_rpe2d(spec)
  with pytest.raises(ValueError, match='rpe-RATIO-METHOD-MODE-SHARED-ON'):
    models.expected_params(models.DETR(enc_rpe2d=spec))


def test_skip_tokens_are_refused():
  config = irpe_jax.get_rpe_config(skip=1, rpe_on='k')
  with pytest.raises(ValueError, match='no skip tokens'):
    detr.parse_enc_rpe2d(config)


@pytest.mark.parametrize('images,mask,match', [
    ((1, 64, 64), (1, 64, 64), 'images must be NHWC'),
    ((1, 64, 64, 3), (1, 64, 32), 'pixel_mask must be bool'),
])
def test_bad_inputs_raise_at_trace_time(images, mask, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(MODEL.init, jax.random.key(0),
                   jax.ShapeDtypeStruct(images, jnp.float32),
                   jax.ShapeDtypeStruct(mask, jnp.bool_))


@pytest.mark.parametrize('fields,match', [
    (dict(hidden_dim=6, num_heads=2), 'hidden_dim=6 must be divisible by 4'),
    (dict(backbone='resnet18'), "backbone='resnet18'"),
    (dict(num_queries=0), 'num_queries'),
    (dict(backbone_width=0), 'backbone_width'),
])
def test_bad_fields_are_named(fields, match):
  with pytest.raises((ValueError, TypeError), match=match):
    models.expected_params(models.DETR(**fields))


def test_a_small_backbone_keeps_the_names_and_narrows_the_channels():
  small = models.DETR(backbone='resnet14', backbone_width=8)
  shapes = jax.eval_shape(lambda rng: detr.init_variables(small, rng),
                          jax.random.key(0))
  body = shapes['params']['backbone_0']['body']
  assert sorted(body) == ['conv1', 'layer1_0', 'layer2_0', 'layer3_0',
                          'layer4_0']
  assert body['conv1']['kernel'].shape == (7, 7, 3, 8)
  assert body['layer4_0']['conv3']['kernel'].shape == (1, 1, 64, 256)
  assert shapes['params']['input_proj']['kernel'].shape == (1, 1, 256, 256)



def test_dc5_dilates_the_last_stage_as_torchvision():
  # A conv of stride 2 equals the stride-1 conv read at even positions, and
  # a 3x3 conv of dilation 2 read at even positions equals a 3x3 conv on
  # the even grid. So torchvision's dilated last stage (first block:
  # stride 1, dilation 1; later blocks: dilation 2) read at even positions
  # is the strided stage exactly; any other dilation schedule is not.
  from irpe_jax.models import resnet  # pylint: disable=g-import-not-at-top
  strided = resnet.ResNet((1, 1, 1, 2), width=4)
  dilated = resnet.ResNet((1, 1, 1, 2), width=4, dilate_last=True)
  images = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
  shapes = jax.eval_shape(strided.init, jax.random.key(1), images)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(
      jnp.shape, jax.eval_shape(dilated.init, jax.random.key(1), images))
  # Drawn in numpy, not by `init` (compiling a ResNet's init and drawing
  # leaf by leaf eagerly took most of this test's 50 s): scaled conv
  # kernels and non-trivial frozen batch norms, so every norm is exercised.
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if leaf.ndim == 4:
      return rng.normal(0, (2 / np.prod(leaf.shape[:-1])) ** 0.5, leaf.shape)
    if "'scale'" in name or "'var'" in name:
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)

  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(draw(path, leaf), jnp.float32), shapes)
  coarse, fine = jax.jit(lambda p, x: (strided.apply(p, x),
                                       dilated.apply(p, x)))(params, images)
  assert coarse.shape == (2, 2, 3, 128) and fine.shape == (2, 4, 6, 128)
  assert strided.stride == 32 and dilated.stride == 16
  np.testing.assert_allclose(fine[:, ::2, ::2], coarse, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(coarse).max()))
  dc5 = models.DETR(backbone='resnet14', backbone_width=8, dilation=True,
                    hidden_dim=16, num_heads=2, enc_layers=1, dec_layers=1,
                    dim_feedforward=8, num_queries=3)
  shapes = jax.eval_shape(lambda rng: detr.init_variables(dc5, rng),
                          jax.random.key(0))
  plain = jax.eval_shape(lambda rng: detr.init_variables(
      dc5.clone(dilation=False), rng), jax.random.key(0))
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, plain)


def _tiny_transformer(**kwargs):
  kwargs = dict(dict(enc_layers=2, dec_layers=2), **kwargs)
  return detr_transformer.Transformer(
      num_heads=2, dim_feedforward=8,
      rpe_config=irpe_jax.parse_rpe_string('rpe-1.9-product-ctx-1-k'),
      **kwargs)


def _transformer_inputs(batch=2, height=3, width=4, dim=8, queries=5):
  rng = np.random.default_rng(1)
  mask = np.zeros((batch, height, width), bool)
  mask[1, 2:] = mask[1, :, 3:] = True
  return (jnp.asarray(rng.normal(size=(batch, height, width, dim)),
                      jnp.float32), jnp.asarray(mask),
          jnp.asarray(rng.normal(size=(queries, dim)), jnp.float32),
          jnp.asarray(rng.normal(size=(batch, height, width, dim)),
                      jnp.float32))


def test_table_init_reaches_every_encoder_table():
  shapes = []

  def init(key, shape, dtype=jnp.float32):
    shapes.append(shape)
    return jnp.zeros(shape, dtype)

  models.expected_params(models.DETR(rpe_table_init=init))
  assert shapes == [(1, 32, 81)] * 6
  with pytest.raises(ValueError, match="rpe_table_init='ones'"):
    models.expected_params(models.DETR(rpe_table_init='ones'))


def test_xavier_table_init_uses_pytorch_fans():
  # (Ht, D, nb): fan_in = D * nb, fan_out = Ht * nb, as torch's xavier.
  table = detr.RPE_TABLE_INITS['xavier_uniform'](jax.random.key(0),
                                                 (1, 32, 81))
  bound = np.sqrt(6 / (32 * 81 + 1 * 81))
  assert bound * 0.99 < np.abs(table).max() <= bound
  assert not detr.RPE_TABLE_INITS['zeros'](jax.random.key(0), (1, 4)).any()


def test_dropout_only_in_training_and_remat_changes_nothing():
  inputs = _transformer_inputs()
  model = functools.partial(_tiny_transformer, enc_layers=1, dec_layers=1)
  params = jax.jit(model().init)(jax.random.key(0, impl='rbg'),
                                *inputs)['params']
  # Not a sum of squares: every output is layer-normed.
  weights = jax.random.normal(jax.random.key(2), (2 * 5 + 3 * 4, 8))

  def loss(params, remat, deterministic):
    hs, memory = model(remat=remat).apply(
        {'params': params}, *inputs, deterministic=deterministic,
        # RBG keys: XLA CPU compiles threefry's unrolled rounds slowly.
        rngs={'dropout': jax.random.key(1, impl='rbg')})
    outputs = jnp.concatenate([hs[-1].reshape(-1, 8),
                               memory[0].reshape(-1, 8)])
    return jnp.sum(outputs * weights)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
  value, grads = grad(params, False, True)
  remat_value, remat_grads = grad(params, True, True)
  golden.assert_close(remat_value, value, 1e-6, 'loss')
  for name, g in golden.flatten(grads).items():
    golden.assert_close(golden.flatten(remat_grads)[name], g, 1e-5, name)
  dropped = jax.jit(loss, static_argnums=(1, 2))(params, False, False)
  assert not np.isclose(dropped, value)


def test_param_labels_freeze_the_stem_and_layer1():
  labels = flax.traverse_util.flatten_dict(
      detr.param_labels(expected_variables()["params"]))
  assert labels[('backbone_0', 'body', 'conv1', 'kernel')] == 'frozen'
  assert labels[('backbone_0', 'body', 'layer1_2', 'conv3', 'kernel')] == (
      'frozen')
  assert labels[('backbone_0', 'body', 'layer2_0', 'conv1', 'kernel')] == (
      'backbone')
  assert labels[('input_proj', 'kernel')] == 'transformer'
  assert set(labels.values()) == {'frozen', 'backbone', 'transformer'}


# Pieces against their PyTorch definitions.


@pytest.mark.parametrize('size_in,size_out', [(160, 5), (128, 4), (200, 7),
                                              (1333, 42), (7, 7), (3, 6)])
def test_mask_shrinks_as_pytorch_nearest(size_in, size_out):
  # PyTorch: src = min(floor(dst * float(in) / out), in - 1), in float32.
  scale = np.float32(size_in) / np.float32(size_out)
  expected = [min(int(np.floor(np.float32(i) * scale)), size_in - 1)
              for i in range(size_out)]
  np.testing.assert_array_equal(detr.nearest_indices(size_in, size_out),
                                expected)


def test_sine_encoding_normalises_over_the_valid_part():
  mask = np.zeros((1, 4, 6), bool)
  mask[0, 3:] = mask[0, :, 4:] = True
  pos = np.asarray(detr.sine_position_encoding(jnp.asarray(mask), 4))
  # First feature of y: sin of the row count over the valid height (3).
  rows = np.sin(np.arange(1, 4) / (3 + 1e-6) * 2 * np.pi)
  np.testing.assert_allclose(pos[0, :3, 0, 0], rows, atol=1e-6)
  cols = np.sin(np.arange(1, 5) / (4 + 1e-6) * 2 * np.pi)
  np.testing.assert_allclose(pos[0, 0, :4, 4], cols, atol=1e-6)
  assert pos.shape == (1, 4, 6, 8)


def test_post_process_boxes_are_pixels_of_the_original_size():
  logits = jnp.array([[[0.0, 3.0, 1.0, 9.0]]])  # no-object is the largest.
  boxes = jnp.array([[[0.5, 0.25, 0.2, 0.5]]])
  post = models.post_process({'pred_logits': logits, 'pred_boxes': boxes},
                             jnp.array([[100, 200]]))
  assert int(post['labels'][0, 0]) == 1
  probs = np.exp([0.0, 3.0, 1.0, 9.0]) / np.exp([0.0, 3.0, 1.0, 9.0]).sum()
  np.testing.assert_allclose(post['scores'][0, 0], probs[1], rtol=1e-6)
  np.testing.assert_allclose(post['boxes'][0, 0], [80, 0, 120, 50], rtol=1e-6)
  np.testing.assert_allclose(
      detr_postprocess.box_xyxy_to_cxcywh(
          detr_postprocess.box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-7)


# Memory: no tensor larger than the attention itself.


def test_no_encoder_tensor_is_larger_than_the_attention():
  """Forward and backward of an iRPE layer, the benchmark's at a test size.

  L = 80 > 49 buckets, as at detection sizes; the release's naive path would
  hold `(L, L, D)` encodings, 8x the `(B, H, L, L)` attention here.
  """
  batch, heads, dim, height, width = 1, 2, 32, 8, 10
  fn, shapes = bench_memory.encoder_layer_grad(
      'rpe-1.9-product-ctx-1-k', 'auto', batch, height, width, heads=heads,
      dim=dim, dim_feedforward=64)
  hlo = jax.jit(fn).lower(*shapes).compile().as_text()
  attention = batch * heads * (height * width) ** 2
  assert bench_memory.largest_array(hlo) == attention
  assert (height * width) ** 2 * (dim // heads) > attention  # It would bite.


# The example script.


def test_predict_prints_the_detections_of_a_checkpoint(variables, tmp_path,
                                                        capsys):
  checkpoint = tmp_path / 'detr.npz'
  np.savez(checkpoint, **{f'state/{k}': v for k, v in
                          convert.flax_to_torch(variables).items()})
  image = tmp_path / 'street.png'
  pixels = np.random.default_rng(0).integers(0, 256, (48, 72, 3), np.uint8)
  Image.fromarray(pixels).save(image)
  assert predict.main(['--checkpoint', str(checkpoint), '--enc_rpe2d',
                       CASE['enc_rpe2d'], '--threshold', '0', '--size', '32',
                       '--max_size', '64', str(image)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f'{image}: {CASE["num_queries"]} detections'
  scores = [float(line.split()[0]) for line in lines[1:]]
  assert len(scores) == CASE['num_queries']
  assert scores == sorted(scores, reverse=True) and 0 < scores[-1]
  assert all(re.fullmatch(r'  [\d.]+  .+  \[(-?[\d.]+, ){3}-?[\d.]+\]', line)
             for line in lines[1:])


def test_predict_names_a_bad_rpe_string_before_loading(tmp_path, capsys):
  with pytest.raises(SystemExit, match="^error: .*enc_rpe2d='rpe-2.0'"):
    predict.main(['--checkpoint', str(tmp_path / 'missing.pth'),
                  '--enc_rpe2d', 'rpe-2.0', 'x.png'])
  del capsys


@pytest.mark.parametrize('hw,expected', [
    ((480, 640), (800, 1066)),   # shorter side to 800
    ((800, 1200), (800, 1200)),  # already there
    ((640, 480), (1066, 800)),
    ((1000, 200), (1335, 267)),  # longer side capped: size 267; as released,
                                 # truncation lands two pixels past 1333
])
def test_resize_is_the_release_eval_resize(hw, expected):
  assert preprocess.resized_size(*hw) == expected


def test_pad_batch_pads_bottom_right_and_marks_the_padding():
  images, mask = preprocess.pad_batch([np.ones((2, 3, 3)), np.ones((4, 1, 3))])
  assert images.shape == (2, 4, 3, 3) and mask.shape == (2, 4, 3)
  assert mask[0].tolist() == [[False] * 3] * 2 + [[True] * 3] * 2
  assert mask[1].tolist() == [[False, True, True]] * 4
  assert not images[mask].any()
