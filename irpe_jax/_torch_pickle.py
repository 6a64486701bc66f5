"""Reads PyTorch `.pth` checkpoints with numpy alone, executing nothing.

`torch.save` (PyTorch >= 1.6) writes a zip: `ARCHIVE/data.pkl`, a pickle of
the object in which every tensor is a call `torch._utils._rebuild_tensor_v2(
storage, offset, size, stride, ...)` on a storage named by a persistent id,
and one raw little-endian file `ARCHIVE/data/KEY` per storage.

The pickle is run by a restricted copy of Python's own unpickler:

- `find_class` allows only the globals a state dict uses (`OrderedDict`, the
  tensor and parameter rebuilders, the storage types) and maps them to numpy
  stand-ins made afresh for each load; `os.system`, `builtins.eval` and every
  other global are refused before anything is called.
- Only the opcodes that build data are dispatched. `REDUCE` calls nothing but
  those stand-ins, `BUILD` only sets plain attributes (such as `_metadata`) on
  an `OrderedDict` built by the same load, `SETITEM`/`APPEND`/`ADDITEMS` only
  fill dicts, lists and sets; `INST`, `OBJ`, `NEWOBJ` and extension codes are
  refused. So nothing a file does reaches an object that outlives its load.
- The work is bounded before it is done: the pickle's size, one unit per
  opcode, the bytes of every storage (checked against the size of its zip
  entry before it is read) and of every tensor are charged to a budget of a
  few times the file's size, so a small crafted file fails at once with a
  `ValueError` instead of asking for gigabytes.
"""

import collections
import contextlib
import dataclasses
import io
import os
import pickle
import reprlib
import struct
import sys
import tarfile
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64,
    'FloatStorage': np.float32,
    'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16,
    'ComplexDoubleStorage': np.complex128,
    'ComplexFloatStorage': np.complex64,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}

# Default budget: this many times the file's size, plus a constant.
BUDGET_FILE_FACTOR = 4
BUDGET_SLACK_BYTES = 64 << 20
# A state dict of a few thousand tensors pickles to well under a MiB.
MAX_PICKLE_BYTES = 64 << 20
# What one opcode is charged: about the size of the object it may create.
_BYTES_PER_OPCODE = 64
# The magic number that the legacy (pre-1.6) format pickles first.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class CheckpointError(ValueError):
  """A checkpoint that is unsafe, corrupt or not a tensor checkpoint."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands for a `torch.*Storage` class in the pickle: only its dtype."""
  name: str
  dtype: np.dtype


def _short(value: Any) -> str:
  """A bounded repr for error messages (crafted values may be huge)."""
  return reprlib.repr(value)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _clip(text: str, limit: int = 100) -> str:
  """`text` cut to `limit` characters for error messages."""
  text = str(text)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _not_a_zip(path: str) -> str:
  """Says what a file that `zipfile` cannot open is instead."""
  with open(path, 'rb') as f:
    head = f.read(64)
  size = os.path.getsize(path)
  if not head:
    return f'{path} is empty (0 bytes), not a checkpoint.'
  if head.startswith(b'PK'):
    return (f'{path} starts as a zip but its directory (at the end) is '
            f'missing or damaged: the file ({size} bytes) is truncated or '
            f'corrupt.')
  legacy_advice = (
      "This reader takes PyTorch's zip format (the default of torch.save "
      'since PyTorch 1.6); re-save it with PyTorch >= 1.6: '
      "torch.save(torch.load(OLD, map_location='cpu'), NEW).")
  magic = b'\x8a\x0a' + _LEGACY_MAGIC.to_bytes(10, 'little')
  if head[:1] == b'\x80' and head[2:14] == magic:
    return (f"{path} is in PyTorch's legacy (pre-1.6) format, which is not a "
            f'zip. {legacy_advice}')
  if tarfile.is_tarfile(path):
    return (f"{path} is a tar file, PyTorch's oldest (pre-0.4) format. "
            f'{legacy_advice}')
  if head[:1] == b'\x80' and 2 <= head[1] <= 5:
    return (f'{path} is a bare pickle, not a torch.save zip; pickles are not '
            f'read here (they can run code).')
  return (f'{path} is not a zip (as a torch.save .pth or a numpy .npz is); '
          f'it starts with {head[:16]!r}.')


def open_zip(path: str) -> zipfile.ZipFile:
  """Opens a checkpoint zip; says precisely why when it is not one.

  Raises:
    FileNotFoundError: if there is no such file.
    IsADirectoryError: if `path` is a folder.
    ValueError: if the file is empty, a truncated zip, PyTorch's legacy
      non-zip format, a bare pickle or anything else but a zip.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file.')
  if os.path.isdir(path):
    raise IsADirectoryError(f'{path} is a folder, not a checkpoint file.')
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
    raise CheckpointError(_not_a_zip(path)) from None


@contextlib.contextmanager
def zip_errors(path: str, info: zipfile.ZipInfo) -> Iterator[None]:
  """Turns what a damaged or encrypted zip entry raises into `ValueError`."""
  if info.flag_bits & 0x1:
    raise CheckpointError(f'{path}: entry {info.filename!r} is encrypted; '
                          f'checkpoints are never encrypted.')
  try:
    yield
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
          RuntimeError, OSError, ValueError) as e:
    raise CheckpointError(f'{path}: entry {info.filename!r} is corrupt '
                          f'({type(e).__name__}: {_clip(e)}).'
                          ) from None


def read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo,
               path: str) -> bytes:
  """Reads one zip entry; a damaged or encrypted one raises `ValueError`."""
  with zip_errors(path, info):
    data = archive.read(info)
  if len(data) != info.file_size:
    raise CheckpointError(f'{path}: entry {info.filename!r} holds '
                          f'{len(data)} bytes, its header says '
                          f'{info.file_size}: the zip is corrupt.')
  return data


class Budget:
  """Bytes a load may still allocate; charged before each allocation."""

  def __init__(self, limit: int, path: str, origin: str):
    self.limit, self.left, self._path, self._origin = limit, limit, path, origin

  def charge(self, nbytes: int, what: str) -> None:
    if nbytes > self.left:
      raise CheckpointError(
          f'{self._path}: {what} would take the load past {self.limit:,} '
          f'bytes ({self._origin}): the file is corrupt or crafted. If it is '
          f'a genuine (for example compressed) checkpoint, pass a larger '
          f'max_bytes.')
    self.left -= nbytes


def default_budget(path: str, max_bytes: Optional[int]) -> Budget:
  """`max_bytes`, or by default a few times the size of the file."""
  if max_bytes is None:
    return Budget(
        BUDGET_FILE_FACTOR * os.path.getsize(path) + BUDGET_SLACK_BYTES, path,
        f'{BUDGET_FILE_FACTOR}x the file size plus '
        f'{BUDGET_SLACK_BYTES >> 20} MiB, far more than it can hold')
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or (
      max_bytes <= 0):
    raise ValueError(f'max_bytes must be a positive int, got {max_bytes!r}.')
  return Budget(max_bytes, path, 'max_bytes')


class _Load:
  """The state of one load: its archive, storages, budget and stand-ins."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str,
               budget: Budget):
    self._archive, self._prefix, self._path = archive, prefix, path
    self.budget = budget
    self._storages: Dict[str, bytes] = {}
    # Fresh per load: nothing a file does to them can reach another load.
    self.globals: Dict[Tuple[str, str], Any] = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch._utils', '_rebuild_tensor_v2'): self.rebuild_tensor,
        ('torch._utils', '_rebuild_parameter'): self.rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'):
            self.rebuild_parameter,
        **{('torch', name): _StorageType(name, np.dtype(dtype))
           for name, dtype in _STORAGE_DTYPES.items()},
    }
    self.callables = tuple(v for v in self.globals.values() if callable(v)
                           and not isinstance(v, _StorageType))

  def storage(self, pid: Any) -> np.ndarray:
    """A storage of the archive, for a persistent id `('storage', ...)`."""
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not _is_int(pid[4]) or pid[4] < 0):
      raise CheckpointError(f'Unsupported persistent id {_short(pid)} in the '
                            f'checkpoint: expected a storage.')
    _, storage_type, key, _, numel = pid
    name = f'{self._prefix}data/{key}'
    try:
      info = self._archive.getinfo(name)
    except KeyError:
      raise CheckpointError(f'The checkpoint has no storage {name!r}.'
                            ) from None
    nbytes = numel * storage_type.dtype.itemsize
    if info.file_size != nbytes:
      raise CheckpointError(
          f'Storage {name!r} declares {numel:,} elements of '
          f'{storage_type.name} ({nbytes:,} bytes) but its zip entry holds '
          f'{info.file_size:,} bytes: the checkpoint is corrupt.')
    if key not in self._storages:
      self.budget.charge(nbytes, f'storage {name!r} ({nbytes:,} bytes)')
      self._storages[key] = read_entry(self._archive, info, self._path)
    # Typed per use: tensors of several dtypes may view one storage.
    return np.frombuffer(self._storages[key], storage_type.dtype)

  def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                     *unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2` on a numpy storage, bounds-checked."""
    del unused  # requires_grad, backward_hooks, metadata.
    if not isinstance(storage, np.ndarray):
      raise CheckpointError(f'A tensor refers to {type(storage).__name__}, '
                            f'not to a storage of the checkpoint.')
    ints = lambda xs: isinstance(xs, tuple) and all(map(_is_int, xs))
    if (not ints(size) or not ints(stride) or not _is_int(offset)
        or len(size) != len(stride) or len(size) > 32
        or min(size + stride + (offset,)) < 0):
      raise CheckpointError(f'Bad tensor layout: size {_short(size)}, '
                            f'stride {_short(stride)}, offset '
                            f'{_short(offset)}.')
    numel = int(np.prod(size, dtype=object))
    self.budget.charge(numel * storage.itemsize,
                       f'a tensor of size {size} ({numel:,} elements)')
    if numel == 0:
      return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise CheckpointError(
          f'A tensor of size {size}, stride {stride} at offset {offset} '
          f'reaches element {last} of a storage of {storage.size}: the '
          f'checkpoint is corrupt.')
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size,
        strides=[s * storage.itemsize for s in stride], writeable=False)
    return np.array(view, order='C')

  def rebuild_parameter(self, data: Any, *unused) -> np.ndarray:
    """`torch._utils._rebuild_parameter[_with_state]`: just its data."""
    del unused  # requires_grad, backward_hooks, state.
    if not isinstance(data, np.ndarray):
      raise CheckpointError(f'A parameter wraps {type(data).__name__}, not a '
                            f'tensor.')
    return data


def _restricted_dispatch() -> Dict[int, Callable[..., None]]:
  """Python's unpickler dispatch, cut down to opcodes that build data."""
  base = pickle._Unpickler.dispatch  # pylint: disable=protected-access
  data_opcodes = (
      'PROTO FRAME STOP MARK POP POP_MARK DUP INT BININT BININT1 BININT2 LONG '
      'LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES '
      'BINBYTES8 UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 NONE '
      'NEWTRUE NEWFALSE FLOAT BINFLOAT EMPTY_LIST LIST EMPTY_TUPLE TUPLE '
      'TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT EMPTY_SET FROZENSET GET BINGET '
      'LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL PERSID '
      'BINPERSID').split()
  table = {getattr(pickle, name)[0]: base[getattr(pickle, name)[0]]
           for name in data_opcodes}

  def target(self, kinds, opcode):
    obj = self.stack[-1]
    if type(obj) not in kinds:
      raise CheckpointError(f'The pickle applies {opcode} to a '
                            f'{type(obj).__name__}; refusing it.')
    return obj

  def load_reduce(self):
    args = self.stack.pop()
    func = self.stack[-1]
    if not any(func is c for c in self.load_state.callables):
      raise CheckpointError(f'The pickle calls {_short(func)}, which is not '
                            f'an allowed global; refusing it.')
    if not isinstance(args, tuple):
      raise CheckpointError('The pickle calls a function with non-tuple '
                            'arguments.')
    self.stack[-1] = func(*args)

  def load_build(self):
    state = self.stack.pop()
    inst = target(self, (collections.OrderedDict,), 'BUILD')
    if not isinstance(state, dict):
      raise CheckpointError(f'BUILD on an OrderedDict with state '
                            f'{_short(state)}: only attributes are allowed.')
    for key, value in state.items():
      if (not isinstance(key, str) or not key.isidentifier()
          or key.startswith('__') or hasattr(collections.OrderedDict, key)):
        raise CheckpointError(f'BUILD would set {_short(key)} on an '
                              f'OrderedDict; refusing it.')
      inst.__dict__[key] = value

  def load_setitems(self):
    items = self.pop_mark()
    mapping = target(self, (dict, collections.OrderedDict), 'SETITEMS')
    if len(items) % 2:
      raise CheckpointError('SETITEMS with an odd number of items.')
    for i in range(0, len(items), 2):
      mapping[items[i]] = items[i + 1]

  def load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    target(self, (dict, collections.OrderedDict), 'SETITEM')[key] = value

  def load_append(self):
    value = self.stack.pop()
    target(self, (list,), 'APPEND').append(value)

  def load_appends(self):
    items = self.pop_mark()
    target(self, (list,), 'APPENDS').extend(items)

  def load_additems(self):
    items = self.pop_mark()
    target(self, (set,), 'ADDITEMS').update(items)

  table.update({pickle.REDUCE[0]: load_reduce, pickle.BUILD[0]: load_build,
                pickle.SETITEM[0]: load_setitem,
                pickle.SETITEMS[0]: load_setitems,
                pickle.APPEND[0]: load_append,
                pickle.APPENDS[0]: load_appends,
                pickle.ADDITEMS[0]: load_additems})

  def charged(handler):
    def run(self):
      self.load_state.budget.charge(_BYTES_PER_OPCODE, 'its pickle')
      handler(self)
    return run

  return {op: charged(handler) for op, handler in table.items()}


class _Dispatch(dict):
  """Refuses, by name, every opcode that is not in the table."""

  def __missing__(self, op: int):
    names = {v[0]: k for k, v in vars(pickle).items()
             if k.isupper() and isinstance(v, bytes) and len(v) == 1}
    raise CheckpointError(
        f'The pickle uses opcode {names.get(op, hex(op))}, which a tensor '
        f'checkpoint does not need; refusing it.')


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickles a tensor checkpoint and nothing else."""

  dispatch = _Dispatch(_restricted_dispatch())

  def __init__(self, data: bytes, load: _Load):
    super().__init__(io.BytesIO(data))
    self.load_state = load

  def find_class(self, module: str, name: str) -> Any:
    allowed = self.load_state.globals.get((module, name))
    if allowed is None:
      raise CheckpointError(
          f'The checkpoint pickle refers to the global {_clip(module)}.'
          f'{_clip(name)}, which a tensor checkpoint does not use; refusing '
          f'to load it (only collections.OrderedDict, torch.*Storage and '
          f'the tensor and parameter rebuilders of torch._utils are '
          f'allowed).')
    return allowed

  def persistent_load(self, pid: Any) -> np.ndarray:
    return self.load_state.storage(pid)


def _pickle_info(archive: zipfile.ZipFile, path: str) -> zipfile.ZipInfo:
  infos = [i for i in archive.infolist()
           if i.filename == 'data.pkl' or i.filename.endswith('/data.pkl')]
  if len(infos) != 1:
    raise CheckpointError(f'{path} is a zip but not a PyTorch checkpoint: it '
                          f'holds {len(infos)} data.pkl files, expected 1.')
  return infos[0]


def load_pth(path: str, *, max_bytes: Optional[int] = None) -> Any:
  """Loads a `torch.save` zip with tensors as numpy arrays.

  Args:
    path: a `.pth` file written by `torch.save` (PyTorch >= 1.6 zip format).
    max_bytes: the most bytes the load may allocate (storages, tensors and
      one small unit per pickle opcode); default 4x the file's size plus
      64 MiB, which a checkpoint that torch wrote (uncompressed) never
      needs.

  Returns:
    The pickled object (typically a dict of state dicts) with every tensor
    replaced by a `np.ndarray`.

  Raises:
    FileNotFoundError: if there is no such file.
    IsADirectoryError: if `path` is a folder.
    ValueError: if the file is not such a zip (saying what it is instead:
      empty, truncated, the legacy format, a bare pickle), an entry is
      corrupt or encrypted, it would need more than `max_bytes`, or its
      pickle refers to anything but tensors, storages and `OrderedDict`.
  """
  path = os.fspath(path)
  with open_zip(path) as archive:
    budget = default_budget(path, max_bytes)
    info = _pickle_info(archive, path)
    prefix = info.filename[:-len('data.pkl')]
    order = 'little'
    if prefix + 'byteorder' in archive.namelist():
      order = read_entry(archive, archive.getinfo(prefix + 'byteorder'),
                         path)[:16].decode('ascii', 'replace').strip()
    if order != 'little' or sys.byteorder != 'little':
      raise CheckpointError(f'Checkpoint byte order {order!r} on a '
                            f'{sys.byteorder}-endian host is not supported.')
    if info.file_size > MAX_PICKLE_BYTES:
      raise CheckpointError(
          f'{path}: its pickle is {info.file_size:,} bytes, more than the '
          f'{MAX_PICKLE_BYTES:,} a state dict needs: corrupt or crafted.')
    budget.charge(info.file_size, 'its pickle')
    data = read_entry(archive, info, path)
    unpickler = _RestrictedUnpickler(data, _Load(archive, prefix, path,
                                                 budget))
    try:
      return unpickler.load()
    except CheckpointError:
      raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError,
            IndexError, KeyError, LookupError, ValueError, struct.error,
            OverflowError, RecursionError) as e:
      raise CheckpointError(f'The pickle in {path} is corrupt: '
                            f'{type(e).__name__}: {_clip(e)}.') from None
