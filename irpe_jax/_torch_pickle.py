"""Reads PyTorch `.pth` checkpoints with numpy alone, executing nothing.

`torch.save` writes a zip: `ARCHIVE/data.pkl` (a pickle of the object, in
which every tensor is a call `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` on a storage given by a persistent id) and one
raw little-endian file `ARCHIVE/data/KEY` per storage. Here the pickle is
read by an `Unpickler` whose `find_class` allows only those few globals
(the same set as `torch.load(..., weights_only=True)` needs for a state
dict) and maps them to numpy stand-ins; any other global, such as
`os.system` or `builtins.eval`, is refused with a `ValueError` before
anything is called. Storages are read from the zip into numpy arrays, and
tensors are strided views of them, copied, with their bounds checked.
"""

import collections
import io
import pickle
import sys
import zipfile
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64,
    'FloatStorage': np.float32,
    'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
  """Stands for a `torch.*Storage` class in the pickle: only its dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Tuple[int, ...],
                    stride: Tuple[int, ...], *unused) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2` on a numpy storage, bounds-checked."""
  del unused  # requires_grad, backward_hooks, metadata.
  if not isinstance(storage, np.ndarray):
    raise ValueError(f'A tensor refers to {type(storage).__name__}, not to a '
                     f'storage of the checkpoint.')
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(offset)
  if len(size) != len(stride) or min(size + stride + (offset,),
                                     default=0) < 0:
    raise ValueError(f'Bad tensor layout: size {size}, stride {stride}, '
                     f'offset {offset}.')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise ValueError(f'A tensor of size {size}, stride {stride} at offset '
                     f'{offset} reaches element {last} of a storage of '
                     f'{storage.size}: the checkpoint is corrupt.')
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * item for s in stride],
      writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  """`torch._utils._rebuild_parameter`: a Parameter is its data here."""
  del unused
  return data


# (module, name) -> what the pickle gets instead. Nothing else is reachable.
_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    **{('torch', name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a tensor checkpoint; refuses every global not in `_ALLOWED`."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._storages: Dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    allowed = _ALLOWED.get((module, name))
    if allowed is None:
      raise ValueError(
          f'The checkpoint pickle refers to the global {module}.{name}, which '
          f'a tensor checkpoint does not use; refusing to load it (only '
          f'{sorted(m + "." + n for m, n in _ALLOWED)} are allowed).')
    return allowed

  def persistent_load(self, pid: Any) -> np.ndarray:
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType)):
      raise ValueError(f'Unsupported persistent id {pid!r} in the checkpoint: '
                       f'expected a storage.')
    _, storage_type, key, _, numel = pid
    key = str(key)
    if key not in self._storages:
      path = f'{self._prefix}data/{key}'
      try:
        raw = self._archive.read(path)
      except KeyError:
        raise ValueError(f'The checkpoint has no storage {path!r}.') from None
      dtype = storage_type.dtype.newbyteorder('<')
      if len(raw) % dtype.itemsize or len(raw) // dtype.itemsize < int(numel):
        raise ValueError(f'Storage {path!r} has {len(raw)} bytes, not '
                         f'{numel} elements of {storage_type.name}.')
      self._storages[key] = np.frombuffer(raw, dtype).astype(
          storage_type.dtype.newbyteorder('='))
    return self._storages[key]


def _pickle_path(archive: zipfile.ZipFile) -> str:
  names = [n for n in archive.namelist()
           if n == 'data.pkl' or n.endswith('/data.pkl')]
  if len(names) != 1:
    raise ValueError(f'Not a PyTorch checkpoint: the zip holds '
                     f'{len(names)} data.pkl files, expected 1.')
  return names[0]


def load_pth(path: str) -> Any:
  """Loads a `torch.save` zip with tensors as numpy arrays.

  Args:
    path: a `.pth` file written by `torch.save` (PyTorch >= 1.6 zip format).

  Returns:
    The pickled object (typically a dict of state dicts) with every tensor
    replaced by a `np.ndarray`.

  Raises:
    ValueError: if the file is not such a zip, is truncated or corrupt, or
      its pickle refers to anything but tensors, storages and OrderedDict.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      pkl = _pickle_path(archive)
      prefix = pkl[:-len('data.pkl')]
      order = archive.read(prefix + 'byteorder').decode().strip() if (
          prefix + 'byteorder') in archive.namelist() else 'little'
      if order != 'little' or sys.byteorder != 'little':
        raise ValueError(f'Checkpoint byte order {order!r} on a '
                         f'{sys.byteorder}-endian host is not supported.')
      data = io.BytesIO(archive.read(pkl))
      return _RestrictedUnpickler(data, archive, prefix).load()
  except zipfile.BadZipFile as e:
    raise ValueError(f'{path} is not a readable PyTorch zip checkpoint '
                     f'(truncated or not a zip; the pre-1.6 legacy format is '
                     f'not supported): {e}.') from None
  except (pickle.UnpicklingError, EOFError, TypeError, AttributeError,
          IndexError) as e:
    raise ValueError(f'The pickle in {path} is corrupt: '
                     f'{type(e).__name__}: {e}.') from None
