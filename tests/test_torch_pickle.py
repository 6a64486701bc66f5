"""Tests of the torch-free `.pth` reader: torch's own files, hostile files.

The reference files in tests/data were written by torch itself (see
tests/data/make_torch_reference.py), so the comparison with `torch.load`
runs without torch. No test here compiles anything with JAX.
"""

import argparse
import copyreg
import os
import pickle
import struct
import subprocess
import tarfile
import time
import zipfile

import ml_dtypes
import numpy as np
import pytest

from irpe_jax import _torch_pickle
from irpe_jax import convert
import golden

DATA = golden.GOLDEN_DIR.parent / 'data'
GOLDEN_PTH = golden.GOLDEN_DIR / 'deit_tiny_ctx_product_50_shared_k_depth2.pth'
GOLDEN_NPZ = GOLDEN_PTH.with_suffix('.npz')
REFERENCES = ('torch_reference.pth', 'torch_reference_protocol4.pth')
FULL_CHECKPOINT = DATA / 'full_training_checkpoint.pth'


def flatten(obj, prefix=''):
  """`{path: array}` and `{path: container type}` of a loaded object."""
  arrays, containers = {}, {}
  if isinstance(obj, dict):
    containers[prefix] = type(obj).__name__
    for key, value in obj.items():
      sub_arrays, sub_containers = flatten(
          value, f'{prefix}/{key}' if prefix else key)
      arrays.update(sub_arrays)
      containers.update(sub_containers)
  else:
    arrays[prefix] = obj
  return arrays, containers


def golden_state():
  with np.load(GOLDEN_NPZ) as data:
    return {k[len('state/'):]: data[k] for k in data.files
            if k.startswith('state/')}


def assert_golden_loads():
  """The golden checkpoint reads back exactly as the release wrote it."""
  state = _torch_pickle.load_pth(str(GOLDEN_PTH))['model']
  expected = golden_state()
  assert list(state) == list(expected)
  for name, value in expected.items():
    assert state[name].dtype == value.dtype, name
    np.testing.assert_array_equal(state[name], value, err_msg=name)


# What torch.load makes of torch's own files.


@pytest.mark.parametrize('name', REFERENCES)
def test_reader_matches_torch_load(name):
  ours, containers = flatten(_torch_pickle.load_pth(str(DATA / name)))
  with np.load(DATA / 'torch_reference.npz') as data:
    reference = dict(data)
  assert ours.keys() == {k[len('value/'):] for k in reference
                         if k.startswith('value/')}
  assert containers == {k[len('container/'):]: str(v) for k, v in
                        reference.items() if k.startswith('container/')}
  dtypes = {'bfloat16': np.dtype(ml_dtypes.bfloat16), 'bool': np.dtype(bool)}
  for path, array in ours.items():
    torch_dtype = str(reference[f'dtype/{path}'])
    expected = reference[f'value/{path}']
    assert isinstance(array, np.ndarray), path
    assert array.dtype == dtypes.get(torch_dtype, np.dtype(torch_dtype)), path
    if torch_dtype == 'bfloat16':  # Stored as its bits.
      array = array.view(np.int16)
    assert array.shape == expected.shape, path
    np.testing.assert_array_equal(array, expected, err_msg=path)


def test_views_of_one_storage_become_independent_arrays():
  shared = _torch_pickle.load_pth(str(DATA / REFERENCES[0]))['shared']
  rows = shared['rows'].copy()
  assert all(a.flags.writeable and a.flags.c_contiguous
             for a in shared.values())
  shared['whole'][:] = -1
  np.testing.assert_array_equal(shared['rows'], rows)


def test_golden_pth_holds_the_release_tensors():
  assert_golden_loads()


# A whole training checkpoint, as DETR's main.py saves it.


def describe(obj, path='', arrays=None):
  """`describe` of make_torch_reference.py, for what the reader loads."""
  arrays = {} if arrays is None else arrays
  sub = lambda key, value: describe(value, f'{path}/{key}' if path else
                                    str(key), arrays)
  if isinstance(obj, np.ndarray):
    arrays[path] = obj
    return f'tensor({path}: {obj.dtype})'
  if isinstance(obj, _torch_pickle.PickledNamespace):
    return 'Namespace(' + ', '.join(
        f'{k}={sub(k, v)}' for k, v in vars(obj).items()) + ')'
  if isinstance(obj, dict):
    attrs = ''.join(f' .{k}={sub(k, v)}'
                    for k, v in getattr(obj, '__dict__', {}).items())
    return f'{type(obj).__name__}{{' + ', '.join(
        f'{k!r}: {sub(k, v)}' for k, v in obj.items()) + '}' + attrs
  if isinstance(obj, (list, tuple)):
    items = [sub(i, v) for i, v in enumerate(obj)]
    if isinstance(obj, list):
      return '[' + ', '.join(items) + ']'
    return '(' + ', '.join(items) + (',)' if len(items) == 1 else ')')
  assert type(obj) in (int, float, bool, str, type(None)), (path, type(obj))
  return repr(obj)


@pytest.fixture(scope='module')
def full_reference():
  with np.load(DATA / 'full_training_checkpoint.npz') as data:
    return str(data['structure']), {k[len('value/'):]: data[k]
                                    for k in data.files
                                    if k.startswith('value/')}


def test_full_training_checkpoint_matches_torch_load(full_reference):
  """Model, AdamW and StepLR state, epoch and args: all as torch.load."""
  structure, tensors = full_reference
  arrays = {}
  assert describe(_torch_pickle.load_pth(str(FULL_CHECKPOINT)), '',
                  arrays) == structure
  assert arrays.keys() == tensors.keys()
  for path, expected in tensors.items():
    assert arrays[path].dtype == expected.dtype, path
    np.testing.assert_array_equal(arrays[path], expected, err_msg=path)


def test_state_dict_of_a_full_training_checkpoint_is_its_model(
    full_reference):
  state = convert.read_state_dict(str(FULL_CHECKPOINT))
  expected = {k[len('model/'):]: v for k, v in full_reference[1].items()
              if k.startswith('model/')}
  assert list(state) == list(expected)
  for name, value in expected.items():
    assert state[name].dtype == value.dtype, name
    np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_args_of_a_training_checkpoint_are_an_inert_record():
  ckpt = _torch_pickle.load_pth(str(FULL_CHECKPOINT))
  args = ckpt['args']
  assert type(args) is _torch_pickle.PickledNamespace
  assert not isinstance(args, argparse.Namespace)
  assert args == _torch_pickle.PickledNamespace(
      lr=1e-4, lr_backbone=1e-5, epochs=300, lr_drop=200,
      frozen_weights=None, backbone='resnet50', aux_loss=True,
      enc_rpe2d='rpe-2.0-product-ctx-1-k', milestones=[100, 200])
  assert ckpt['optimizer']['param_groups'][1]['betas'] == (0.9, 0.999)
  assert ckpt['optimizer']['param_groups'][1]['lr'] == args.lr_backbone


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_namespaces_pickled_by_python_load_as_records(archive, protocol):
  fields = {'lr': 0.5, 'name': 'detr', 'steps': [1, 2], 'pair': (True,),
            'off': None, 'sub': {3: 'x'}, 'config-file': 'a.yaml',
            '_private': -1}
  if protocol >= 4:  # Sets before protocol 4 are calls of builtins.set.
    fields['tags'] = {'a', frozenset({1})}
  loaded = _torch_pickle.load_pth(archive(pickle.dumps(
      {'args': argparse.Namespace(**fields), 'none': argparse.Namespace()},
      protocol=protocol)))
  assert type(loaded['args']) is _torch_pickle.PickledNamespace
  assert vars(loaded['args']) == fields
  assert loaded['none'] == _torch_pickle.PickledNamespace()


def test_namespaces_pickled_before_protocol_2_are_refused(archive):
  # Protocols 0 and 1 rebuild objects with copyreg._reconstructor, a call.
  with pytest.raises(ValueError, match='copy_?reg._reconstructor.*refusing'):
    _torch_pickle.load_pth(archive(pickle.dumps(argparse.Namespace(a=1),
                                                protocol=1)))


# Hand-made pickles and archives.


def _str(text: str) -> bytes:
  data = text.encode()
  return b'X' + struct.pack('<I', len(data)) + data


def _int(n: int) -> bytes:
  if -2**31 <= n < 2**31:
    return b'J' + struct.pack('<i', n)
  data = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(data)]) + data


def _tuple(*items: bytes) -> bytes:
  return b'(' + b''.join(items) + b't'


def _global(module: str, name: str) -> bytes:
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _storage(key='0', numel=4, kind='FloatStorage') -> bytes:
  return _tuple(_str('storage'), _global('torch', kind), _str(key),
                _str('cpu'), _int(numel)) + b'Q'


def _tensor(size, stride, offset=0, storage=None) -> bytes:
  """`_rebuild_tensor_v2(storage, offset, size, stride, False, {})`."""
  return _global('torch._utils', '_rebuild_tensor_v2') + _tuple(
      storage or _storage(), _int(offset), _tuple(*map(_int, size)),
      _tuple(*map(_int, stride)), b'\x89',
      _global('collections', 'OrderedDict') + b')R') + b'R'


def _checkpoint(**tensors: bytes) -> bytes:
  """A protocol-2 pickle of `{'model': {name: tensor}}`."""
  items = b''.join(_str(k) + v for k, v in tensors.items())
  return b'\x80\x02}' + _str('model') + b'}(' + items + b'us.'


def write_archive(path, payload: bytes, storages=None,
                  compression=zipfile.ZIP_STORED):
  """A torch.save-like zip holding `payload` as its pickle."""
  if storages is None:
    storages = {'0': np.arange(4, dtype=np.float32).tobytes()}
  with zipfile.ZipFile(path, 'w', compression) as archive:
    archive.writestr('archive/data.pkl', payload)
    archive.writestr('archive/byteorder', 'little')
    for key, data in storages.items():
      archive.writestr(f'archive/data/{key}', data)
  return str(path)


def replace_pickle(path, payload: bytes):
  """The golden .pth with its data.pkl replaced by `payload`."""
  with zipfile.ZipFile(GOLDEN_PTH) as src, zipfile.ZipFile(path, 'w') as dst:
    for info in src.infolist():
      dst.writestr(info, payload if info.filename.endswith('/data.pkl')
                   else src.read(info))
  return str(path)


@pytest.fixture
def archive(tmp_path):
  def make(payload, **kwargs):
    return write_archive(tmp_path / 'x.pth', payload, **kwargs)
  return make


def test_hand_made_checkpoints_load(archive):
  """The helpers above make files the reader takes: refusals are real."""
  state = _torch_pickle.load_pth(archive(_checkpoint(
      x=_tensor((2, 2), (1, 2), offset=0), y=_tensor((3,), (1,), 1))))
  np.testing.assert_array_equal(state['model']['x'], [[0, 2], [1, 3]])
  np.testing.assert_array_equal(state['model']['y'], [1, 2, 3])


# Nothing a file does outlives its load.


@pytest.mark.parametrize('state', [
    # BUILD with a dict: sets the stand-in's __dict__.
    b'}' + _str('dtype') + b'K\x01s',
    # BUILD with (None, slots): setattr on the stand-in.
    b'N}' + _str('dtype') + b'K\x01s\x86',
    # Renames the storage type instead.
    b'}' + _str('name') + _str('BoolStorage') + b's',
], ids=['dict', 'slots', 'name'])
def test_a_file_cannot_change_the_allow_list_for_later_loads(tmp_path, state):
  poison = (b'\x80\x02' + _global('torch', 'FloatStorage') + state
            + b'b0}.')
  with pytest.raises(ValueError, match='BUILD'):
    _torch_pickle.load_pth(replace_pickle(tmp_path / 'poison.pth', poison))
  assert_golden_loads()


@pytest.mark.parametrize('target', [
    _global('torch._utils', '_rebuild_tensor_v2'),
    _global('collections', 'OrderedDict'),
    _storage(),
], ids=['function', 'class', 'storage'])
def test_build_on_anything_but_a_fresh_ordered_dict_is_refused(
    archive, target):
  payload = b'\x80\x02' + target + b'}' + _str('x') + b'K\x01sb0}.'
  with pytest.raises(ValueError, match='BUILD'):
    _torch_pickle.load_pth(archive(payload))


@pytest.mark.parametrize('key', ['items', '__class__', '__dict__', 'keys'])
def test_build_cannot_shadow_ordered_dict_methods(archive, key):
  payload = (b'\x80\x02' + _global('collections', 'OrderedDict') + b')R}'
             + _str(key) + b'K\x01sb.')
  with pytest.raises(ValueError, match='BUILD would set'):
    _torch_pickle.load_pth(archive(payload))


def test_ordered_dict_metadata_is_kept(archive):
  payload = (b'\x80\x02' + _global('collections', 'OrderedDict') + b')R}'
             + _str('_metadata') + b'K\x07sb.')
  assert _torch_pickle.load_pth(archive(payload))._metadata == 7


# Memory and work are bounded before they are spent.


def test_a_tiny_file_cannot_ask_for_16_gib(archive):
  path = archive(_checkpoint(x=_tensor((2**17, 2**15), (0, 0))))
  assert os.path.getsize(path) < 10_000
  start = time.perf_counter()
  with pytest.raises(ValueError, match='corrupt or crafted'):
    _torch_pickle.load_pth(path)
  assert time.perf_counter() - start < 5


def test_storage_sizes_are_checked_against_the_archive(archive):
  path = archive(_checkpoint(x=_tensor((4,), (1,), storage=_storage(
      numel=2**32))))
  with pytest.raises(ValueError, match='declares 4,294,967,296 elements'):
    _torch_pickle.load_pth(path)


def test_tensors_outside_their_storage_are_refused(archive):
  with pytest.raises(ValueError, match='reaches element 999 of a storage'):
    _torch_pickle.load_pth(archive(_checkpoint(x=_tensor((1000,), (1,)))))


@pytest.fixture(scope='module')
def zip_bomb(tmp_path_factory):
  """A 128 MiB storage of zeros, deflated to a file of about 130 KB."""
  path = tmp_path_factory.mktemp('bomb') / 'bomb.pth'
  numel = 2**25
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
    archive.writestr('archive/data.pkl', _checkpoint(x=_tensor(
        (numel,), (1,), storage=_storage(numel=numel))))
    with archive.open('archive/data/0', 'w', force_zip64=True) as f:
      chunk = bytes(1 << 22)
      for _ in range(numel * 4 // len(chunk)):
        f.write(chunk)
  return str(path)


def test_compressed_storages_cannot_expand_past_the_budget(zip_bomb):
  assert os.path.getsize(zip_bomb) < 2**20
  start = time.perf_counter()
  with pytest.raises(ValueError, match='max_bytes'):
    _torch_pickle.load_pth(zip_bomb)
  assert time.perf_counter() - start < 5


def test_max_bytes_admits_a_genuinely_compressed_checkpoint(tmp_path):
  path = write_archive(tmp_path / 'z.pth', _checkpoint(x=_tensor(
      (2**20,), (1,), storage=_storage(numel=2**20))),
                       storages={'0': bytes(2**22)},
                       compression=zipfile.ZIP_DEFLATED)
  with pytest.raises(ValueError, match='max_bytes'):
    _torch_pickle.load_pth(path, max_bytes=2**22)
  state = _torch_pickle.load_pth(path, max_bytes=2**24)
  assert state['model']['x'].shape == (2**20,) and not state['model']['x'].any()


def test_many_copies_of_one_storage_are_bounded(tmp_path):
  """20000 tensors over the golden file's largest storage ask for 11 GB."""
  storage = _storage(key='2', numel=589824 // 4)
  tensor = (_global('torch._utils', '_rebuild_tensor_v2') + b'q\x00'
            + _tuple(storage, _int(0), _tuple(_int(147456)),
                     _tuple(_int(1)), b'\x89', b'N') + b'q\x01R')
  again = b'h\x00h\x01R'  # The same call from the memo: 5 bytes a tensor.
  payload = b'\x80\x02](' + tensor + again * 20000 + b'e.'
  start = time.perf_counter()
  with pytest.raises(ValueError, match='corrupt or crafted'):
    _torch_pickle.load_pth(replace_pickle(tmp_path / 'copies.pth', payload))
  assert time.perf_counter() - start < 5


def _builds(count: int, make: bytes, attributes: int = 1000) -> bytes:
  """`count` objects, each BUILT from one memoised state of `attributes`."""
  state = b'}q\x00(' + b''.join(
      _str(f'a{i}') + b'N' for i in range(attributes)) + b'u0'
  return (b'\x80\x02' + state + make[:-2] + b'q\x010' + b'](' + (
      b'h\x01' + make[-2:] + b'h\x00b') * count + b'e.')


@pytest.mark.parametrize('make', [
    _global('collections', 'OrderedDict') + b')R',
    _global('argparse', 'Namespace') + b')\x81',
], ids=['ordered_dict', 'namespace'])
def test_attributes_that_build_copies_are_charged(archive, make):
  """A state reused from the memo is copied by each BUILD: each is paid."""
  # 100 copies of 1000 attributes: 6.4 MB of charges from a 14 KB pickle.
  loaded = _torch_pickle.load_pth(archive(_builds(100, make)))
  assert len(loaded) == 100 and len(vars(loaded[-1])) == 1000
  with pytest.raises(ValueError, match='its pickle'):
    _torch_pickle.load_pth(archive(_builds(100, make)), max_bytes=2**22)
  # 20000 copies: 20 million attributes (gigabytes) from a 150 KB file.
  start = time.perf_counter()
  with pytest.raises(ValueError, match='corrupt or crafted'):
    _torch_pickle.load_pth(archive(_builds(20000, make)))
  assert time.perf_counter() - start < 5


def test_pickle_work_is_charged(archive):
  payload = b'\x80\x02]q\x00(' + b'}' * 50000 + b'e.'
  with pytest.raises(ValueError, match='its pickle'):
    _torch_pickle.load_pth(archive(payload), max_bytes=2**21)
  assert len(_torch_pickle.load_pth(archive(payload))) == 50000


# What is not a zip says what it is.


def test_missing_file_and_folder_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file'):
    _torch_pickle.load_pth(str(tmp_path / 'nothing.pth'))
  with pytest.raises(IsADirectoryError, match='is a folder'):
    _torch_pickle.load_pth(str(tmp_path))


def test_legacy_format_is_named_with_how_to_resave():
  with pytest.raises(ValueError, match=r"legacy \(pre-1.6\) format.*"
                     r'torch.save\(torch.load'):
    _torch_pickle.load_pth(str(DATA / 'legacy_format.pth'))


@pytest.mark.parametrize('content, match', [
    (b'', 'is empty'),
    (GOLDEN_PTH.read_bytes()[:100_000], 'truncated or corrupt'),
    (pickle.dumps({'x': 1}, protocol=2), 'bare pickle'),
    (b'hello world', 'is not a zip'),
], ids=['empty', 'truncated', 'pickle', 'text'])
def test_non_zips_say_what_they_are(tmp_path, content, match):
  path = tmp_path / 'x.pth'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=match):
    _torch_pickle.load_pth(str(path))


def test_tar_format_is_named(tmp_path):
  path = tmp_path / 'old.pth'
  with tarfile.open(path, 'w') as tar:
    tar.add(DATA / 'legacy_format.pth', arcname='tensors')
  with pytest.raises(ValueError, match='tar file.*re-save'):
    _torch_pickle.load_pth(str(path))


def _flip(data: bytes, offset: int) -> bytes:
  return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def test_corrupt_stored_entry_raises_value_error(tmp_path):
  data = GOLDEN_PTH.read_bytes()
  with zipfile.ZipFile(GOLDEN_PTH) as archive:
    info = archive.getinfo(archive.namelist()[5])  # A storage.
  # Local header (30 bytes + name + extra), then the stored bytes.
  start = info.header_offset + 30 + len(info.filename.encode()) + struct.unpack(
      '<H', data[info.header_offset + 28:info.header_offset + 30])[0]
  path = tmp_path / 'crc.pth'
  path.write_bytes(_flip(data, start + 100))
  with pytest.raises(ValueError, match='is corrupt.*CRC'):
    _torch_pickle.load_pth(str(path))


def test_corrupt_deflated_entry_raises_value_error(tmp_path):
  path = write_archive(tmp_path / 'd.pth', _checkpoint(x=_tensor(
      (4,), (1,))), compression=zipfile.ZIP_DEFLATED)
  data = bytearray(open(path, 'rb').read())
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo('archive/data.pkl')
  body = info.header_offset + 30 + len(info.filename)
  data[body:body + 8] = b'\xff' * 8
  open(path, 'wb').write(bytes(data))
  with pytest.raises(ValueError, match='is corrupt'):
    _torch_pickle.load_pth(path)


def test_encrypted_entry_raises_value_error(tmp_path):
  path = write_archive(tmp_path / 'e.pth', _checkpoint(x=_tensor((4,), (1,))))
  data = bytearray(open(path, 'rb').read())
  # Set the "encrypted" flag in the central directory entry of data.pkl.
  central = data.find(b'PK\x01\x02')
  data[central + 8] |= 0x1
  open(path, 'wb').write(bytes(data))
  with pytest.raises(ValueError, match='encrypted'):
    _torch_pickle.load_pth(path)


# Malicious payloads: refused, and nothing ran.


class _Reduce:
  """Pickles as a call `func(*args)`: what a malicious checkpoint holds."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _touch_code(path='PWNED') -> str:
  return f'open({path!r}, "w").close()'


def _wrapped(obj, protocol=2) -> bytes:
  return pickle.dumps({'model': {'x': obj}}, protocol=protocol)


def _payloads():
  touch = _touch_code()
  getattr_chain = (  # getattr(__import__('os'), 'system')('touch PWNED')
      b'\x80\x02' + _global('builtins', 'getattr') + _tuple(
          _global('builtins', '__import__') + _tuple(_str('os')) + b'R',
          _str('system')) + b'R' + _tuple(_str('touch PWNED')) + b'R.')
  return {
      'os.system': _wrapped(_Reduce(os.system, 'touch PWNED')),
      'subprocess': _wrapped(_Reduce(subprocess.call, ['touch', 'PWNED'])),
      'eval': _wrapped(_Reduce(eval, touch)),
      'exec': _wrapped(_Reduce(exec, touch)),
      'exec_protocol0': _wrapped(_Reduce(exec, touch), protocol=0),
      'exec_protocol4': _wrapped(_Reduce(exec, touch), protocol=4),
      'exec_protocol5': _wrapped(_Reduce(exec, touch), protocol=5),
      'getattr_chain': getattr_chain,
      'os.system_protocol4': _wrapped(_Reduce(os.system, 'touch PWNED'),
                                      protocol=4),
      'inst_protocol0': b"(S'touch PWNED'\nios\nsystem\n.",
      'obj_protocol1': (b'(' + _global('os', 'system')
                        + b"S'touch PWNED'\no."),
      'newobj': (b'\x80\x02' + _global('copyreg', '_reconstructor')
                 + _tuple(_global('os', 'system'),
                          _global('builtins', 'object'), b'N') + b'R.'),
      'numpy_reconstruct': _wrapped(np.array([_Reduce(exec, touch)],
                                             dtype=object)),
      'numpy_load': _wrapped(_Reduce(np.load, 'evil.npy', None, True)),
      'torch_load': (b'\x80\x02' + _global('torch', 'load')
                     + _tuple(_str('evil.pth')) + b'R.'),
      'torch_hub': (b'\x80\x02' + _global('torch.hub', 'load')
                    + _tuple(_str('evil'), _str('x')) + b'R.'),
      'codecs': (b'\x80\x02' + _global('_codecs', 'encode')
                 + _tuple(_str('x'), _str('latin1')) + b'R.'),
      'ext1': b'\x80\x02\x82\xf0' + _tuple(_str('touch PWNED')) + b'R.',
      'rebuild_calls_global': (
          b'\x80\x02' + _global('torch._utils', '_rebuild_parameter')
          + _tuple(_global('builtins', 'exec') + _tuple(_str(touch)) + b'R')
          + b'R.'),
  }


_NAMESPACE = _global('argparse', 'Namespace')
_REBUILD = _global('torch._utils', '_rebuild_tensor_v2')


def _fields(**values: bytes) -> bytes:
  """A dict `{name: value}` of pickled values: the state BUILD gets."""
  return b'}(' + b''.join(_str(k) + v for k, v in values.items()) + b'u'


def _as_args(obj: bytes, protocol=2) -> bytes:
  """A pickle of `{'args': obj}`: where a training checkpoint keeps it."""
  return bytes([0x80, protocol]) + b'}' + _str('args') + obj + b's.'


def _walk_refusal(where: str) -> str:
  """What the reader says of a non-data value at `checkpoint` + `where`."""
  return f'at checkpoint{where}, where a checkpoint holds only data'


def _namespace_payloads():
  """Abuses of argparse.Namespace and of stand-ins placed where data goes.

  argparse.Namespace is the one class a file may instantiate (NEWOBJ).

  Each is `(payload, what the error says)`; all must be refused without
  anything running.
  """
  made = _NAMESPACE + b')\x81'  # NEWOBJ(Namespace): an empty record.
  touch = _tuple(_str('touch PWNED'))
  payloads = {
      'newobj_with_args': (_NAMESPACE + touch + b'\x81',
                           'NEWOBJ with arguments'),
      'newobj_with_dict_args': (_NAMESPACE + b'}\x81',
                                'NEWOBJ with arguments'),
      'newobj_ex': (_NAMESPACE + b')}\x92', 'opcode NEWOBJ_EX'),
      'newobj_of_a_record': (made + b')\x81', 'NEWOBJ on PickledNamespace'),
      'newobj_of_ordered_dict': (_global('collections', 'OrderedDict')
                                 + b')\x81', 'NEWOBJ on'),
      'newobj_of_storage_type': (_global('torch', 'FloatStorage') + b')\x81',
                                 'NEWOBJ on'),
      'newobj_of_rebuilder': (_REBUILD + b')\x81', 'NEWOBJ on'),
      'call_namespace': (_NAMESPACE + touch + b'R', 'not an allowed global'),
      'call_a_record': (made + touch + b'R', 'not an allowed global'),
      'build_on_the_class': (_NAMESPACE + _fields(x=b'K\x01') + b'b',
                             'applies BUILD to a _NamespaceClass'),
      'build_slots_state': (made + b'N' + _fields(x=b'K\x01') + b'\x86b',
                            'only a dict of attributes'),
      'build_list_state': (made + b']b', 'only a dict of attributes'),
      'build_ordered_dict_state': (
          made + _global('collections', 'OrderedDict') + b')R' + b'b',
          'only a dict of attributes'),
      'build_none_state': (made + b'Nb', 'only a dict of attributes'),
      'setitem_on_a_record': (made + _str('x') + b'K\x01s',
                              'applies SETITEM to a PickledNamespace'),
      'append_to_a_record': (made + b'K\x01a',
                             'applies APPEND to a PickledNamespace'),
      'int_key': (made + b'}K\x01K\x02sb', 'BUILD would set 1'),
      'tuple_key': (made + b'}' + _tuple(_str('a')) + b'K\x02sb',
                    'BUILD would set'),
      # Values: only data, wherever they are and whenever they were added.
      'rebuilder_as_value': (made + _fields(x=_REBUILD) + b'b',
                             _walk_refusal(r"\['args'\].x")),
      'class_as_value': (made + _fields(
          x=_global('collections', 'OrderedDict')) + b'b', 'only data'),
      'namespace_class_as_value': (made + _fields(x=_NAMESPACE) + b'b',
                                   'only data'),
      'storage_type_as_value': (made + _fields(
          x=_global('torch', 'FloatStorage')) + b'b', 'only data'),
      'rebuilder_nested_in_a_value': (
          made + _fields(x=b']' + _tuple(b'N', _REBUILD) + b'a') + b'b',
          _walk_refusal(r"\['args'\].x\[0\]\[1\]")),
      'rebuilder_added_after_build': (
          made + b'}' + _str('x') + b']q\x63sb' + b'h\x63' + _REBUILD
          + b'a0', _walk_refusal(r"\['args'\].x\[0\]")),
      'rebuilder_as_a_key': (made + b'}' + _REBUILD + b'K\x01sb',
                             'BUILD would set'),
      'rebuilder_as_a_dict_key': (made + _fields(x=b'}' + _REBUILD + b'K\x01s')
                                  + b'b',
                                  _walk_refusal(r"\['args'\].x.keys\(\)")),
      # Other globals, reached by name through the stand-in's module.
      'argparse_sys': (_global('argparse', '_sys'), 'refusing'),
      'argparse_parser': (_global('argparse', 'ArgumentParser') + touch
                          + b'R', 'refusing'),
      'namespace_attribute': (_global('argparse', 'Namespace.__init__'),
                              'refusing'),
  }
  payloads = {name: (_as_args(payload), match)
              for name, (payload, match) in payloads.items()}
  for key in ('__class__', '__dict__', '__init__', '__reduce_ex__',
              '__setstate__', '__getattribute__', '__eq__', '__weakref__'):
    payloads[f'key{key}'] = (_as_args(
        made + _fields(**{key: _global('collections', 'OrderedDict')}) + b'b'),
        f'BUILD would set {key!r}')
  payloads['dotted_stack_global'] = (
      b'\x80\x04\x8c\x08argparse\x8c\x1eNamespace.__init__.__globals__'
      b'\x93.', 'Namespace.__init__.__globals__.*refusing')
  payloads['rebuilder_in_model'] = (
      b'\x80\x02}' + _str('model') + _fields(x=_REBUILD) + b's.',
      _walk_refusal(r"\['model'\]\['x'\]"))
  payloads['rebuilder_in_metadata'] = (
      b'\x80\x02' + _global('collections', 'OrderedDict') + b')R'
      + _fields(_metadata=_REBUILD) + b'b.',
      _walk_refusal('._metadata'))
  return payloads


NAMESPACE_PAYLOADS = _namespace_payloads()
PAYLOADS = {**_payloads(), **{f'namespace_{k}': v for k, (v, _) in
                              NAMESPACE_PAYLOADS.items()}}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
  """A cwd holding an `evil.npy` whose unpickling would create PWNED."""
  monkeypatch.chdir(tmp_path)
  np.save('evil.npy', np.array([_Reduce(exec, _touch_code())], dtype=object),
          allow_pickle=True)
  copyreg.add_extension('os', 'system', 0xF0)
  yield tmp_path
  copyreg.remove_extension('os', 'system', 0xF0)


@pytest.mark.parametrize('name', [
    'os.system', 'eval', 'exec', 'exec_protocol0', 'exec_protocol4',
    'exec_protocol5', 'numpy_reconstruct', 'numpy_load', 'ext1'])
def test_payloads_are_live(sandbox, name):
  """Control: unpickled normally, each payload does create the sentinel."""
  try:
    pickle.loads(PAYLOADS[name])
  except Exception:  # pylint: disable=broad-except
    pass  # Some fail after running (e.g. exec returns None into a dict).
  assert (sandbox / 'PWNED').exists()


@pytest.mark.parametrize('name', sorted(PAYLOADS))
@pytest.mark.parametrize('container', ['own', 'golden'])
def test_malicious_payloads_are_refused_and_nothing_runs(sandbox, name,
                                                         container):
  if container == 'own':
    path = write_archive(sandbox / 'evil.pth', PAYLOADS[name])
  else:
    path = replace_pickle(sandbox / 'evil.pth', PAYLOADS[name])
  calls = []
  with pytest.MonkeyPatch.context() as patch:
    # A broken reader would record these instead of running a shell.
    for module, attr in ((os, 'system'), (subprocess, 'call')):
      patch.setattr(module, attr,
                    lambda *a, _n=attr, **k: calls.append(_n))
    with pytest.raises(ValueError, match='refusing|not an allowed'):
      _torch_pickle.load_pth(path)
  assert not calls
  assert not (sandbox / 'PWNED').exists()


def test_payload_in_an_extra_entry_of_a_real_archive_is_never_read(sandbox):
  path = sandbox / 'extra.pth'
  with zipfile.ZipFile(GOLDEN_PTH) as src, zipfile.ZipFile(path, 'w') as dst:
    for info in src.infolist():
      dst.writestr(info, src.read(info))
    prefix = src.namelist()[0].split('/')[0]
    dst.writestr(f'{prefix}/data/evil', PAYLOADS['exec'])
    dst.writestr(f'{prefix}/extra.pkl', PAYLOADS['exec'])
  state = _torch_pickle.load_pth(str(path))['model']
  assert set(state) == set(golden_state())
  assert not (sandbox / 'PWNED').exists()
  with zipfile.ZipFile(path, 'a') as dst:
    dst.writestr('second/data.pkl', PAYLOADS['exec'])
  with pytest.raises(ValueError, match='2 data.pkl files'):
    _torch_pickle.load_pth(str(path))
  assert not (sandbox / 'PWNED').exists()


@pytest.mark.parametrize('name', sorted(NAMESPACE_PAYLOADS))
def test_namespace_abuses_are_refused_clearly(archive, name):
  payload, match = NAMESPACE_PAYLOADS[name]
  with pytest.raises(ValueError, match=match):
    _torch_pickle.load_pth(archive(payload))


def test_shared_self_referencing_and_deep_data_is_checked_once(archive):
  made = _NAMESPACE + b')\x81'
  cycle = _torch_pickle.load_pth(archive(
      b'\x80\x02]q\x00h\x00a' + made + b'q\x01}' + _str('me') + b'h\x01s'
      + _str('list') + b'h\x00sba.'))
  assert cycle[0] is cycle and cycle[1].me is cycle[1]
  assert cycle[1].list is cycle
  depth = 20_000  # Far past the recursion limit.
  deep = _torch_pickle.load_pth(archive(
      b'\x80\x02' + b']' * depth + b'a' * (depth - 1) + b'.'))
  for _ in range(depth - 1):
    deep, = deep
  assert deep == []
  path = r'checkpoint(\[0\]){10}\.{3}(\[0\]){10}, where'
  with pytest.raises(ValueError, match=path):
    _torch_pickle.load_pth(archive(
        b'\x80\x02' + b']' * depth + _REBUILD + b'a' * depth + b'.'))


def test_a_record_is_made_afresh_and_changes_no_later_load(archive):
  attributes = dict(vars(_torch_pickle.PickledNamespace))
  payload = _as_args(_NAMESPACE + b')\x81' + _fields(lr=b'K\x01') + b'b')
  first = _torch_pickle.load_pth(archive(payload))['args']
  second = _torch_pickle.load_pth(archive(payload))['args']
  assert first == second and first is not second
  first.lr = 2
  assert second.lr == 1
  assert dict(vars(_torch_pickle.PickledNamespace)) == attributes


@pytest.mark.parametrize('payload, match', [
    (b'\x80\x02' + _global('collections', 'OrderedDict') + b'\x81.',
     'opcode NEWOBJ'),
    (b'\x80\x05\x96\x03\x00\x00\x00\x00\x00\x00\x00abc.', 'BYTEARRAY8'),
    (b'\x80\x02P1\n.', 'persistent id'),
    (b'\x80\x02\xff.', 'opcode 0xff'),
    (b'\x80\x02' + _global('collections', 'OrderedDict') + b'K\x01a.',
     'APPEND to a type'),
    (b'\x80\x02' + _storage() + b'K\x01K\x02s.', 'SETITEM to a ndarray'),
    (b'\x80\x02K\x01)R.', 'calls 1'),
], ids=['newobj', 'bytearray8', 'persid', 'unknown', 'append', 'setitem',
        'reduce'])
def test_opcodes_beyond_data_are_refused(archive, payload, match):
  with pytest.raises(ValueError, match=match):
    _torch_pickle.load_pth(archive(payload))


@pytest.mark.parametrize('payload', [
    b'\x80\x02(K\x01u.',  # SETITEMS with no dict.
    b'\x80\x02h\x07.',  # Memo slot never set.
    b'\x80\x02L' + b'9' * 5000 + b'\n.',  # A long past the digit limit.
    b'\x80\x02',  # Nothing after the protocol.
], ids=['mark', 'memo', 'long', 'eof'])
def test_corrupt_pickles_raise_value_error(archive, payload):
  with pytest.raises(ValueError, match='corrupt'):
    _torch_pickle.load_pth(archive(payload))
