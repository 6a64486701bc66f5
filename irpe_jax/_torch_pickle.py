"""Reads PyTorch `.pth` checkpoints with numpy alone, executing nothing.

`torch.save` (PyTorch >= 1.6) writes a zip: `ARCHIVE/data.pkl`, a pickle of
the object in which every tensor is a call `torch._utils._rebuild_tensor_v2(
storage, offset, size, stride, ...)` on a storage named by a persistent id,
and one raw little-endian file `ARCHIVE/data/KEY` per storage.

The pickle is run by a restricted copy of Python's own unpickler:

- `find_class` allows only the globals a training checkpoint uses
  (`OrderedDict`, the tensor and parameter rebuilders, the storage types,
  and `argparse.Namespace`, which DETR-style training scripts save as
  `'args'`) and maps them to numpy stand-ins made afresh for each load;
  `os.system`, `builtins.eval` and every other global are refused before
  anything is called.
- Only the opcodes that build data are dispatched. `REDUCE` calls nothing but
  those stand-ins; `NEWOBJ` only makes an empty `PickledNamespace` for
  `argparse.Namespace`; `BUILD` only sets plain attributes (such as
  `_metadata`) on an `OrderedDict` or a `PickledNamespace` built by the same
  load; `SETITEM`/`APPEND`/`ADDITEMS` only fill dicts, lists and sets;
  `INST`, `OBJ`, `NEWOBJ_EX` and extension codes are refused. Before the
  object is returned, every value in it is checked to be data (numbers,
  strings, arrays and containers of them), so no stand-in function or class
  leaves the load.
- The work is bounded before it is done: the pickle's size, one unit per
  opcode (and per attribute a `BUILD` copies), the bytes of every storage
  (checked against the size of its zip entry before it is read) and of
  every tensor are charged to a budget of a few times the file's size, so a
  small crafted file fails at once with a `ValueError` instead of asking
  for gigabytes.
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
import types
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


class PickledNamespace(types.SimpleNamespace):
  """What an `argparse.Namespace` in a checkpoint loads as: its fields.

  Training scripts (DETR's `main.py`, for one) save their command line as
  `'args'` next to the model. It comes back as this inert record, never as
  the real `argparse` class: fields are attributes (`ckpt['args'].lr`) or
  `vars(ckpt['args'])`, and each holds data only (numbers, strings, `None`,
  arrays and lists, tuples, dicts and sets of them).
  """


@dataclasses.dataclass(frozen=True, eq=False)
class _NamespaceClass:
  """Stands for `argparse.Namespace` in the pickle: `NEWOBJ` of it only."""


# The types a loaded checkpoint may hold: leaves and containers of them.
_DATA_LEAVES = (type(None), bool, int, float, complex, str, bytes, np.ndarray)
_CONTAINERS = (list, tuple, set, frozenset, dict, collections.OrderedDict,
               PickledNamespace)
# What BUILD may not set on an instance: any attribute of its class.
_CLASS_ATTRIBUTES = {cls: frozenset(dir(cls))
                     for cls in (collections.OrderedDict, PickledNamespace)}


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
        ('argparse', 'Namespace'): _NamespaceClass(),
    }
    self.namespace_class = self.globals[('argparse', 'Namespace')]
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

  def load_newobj(self):
    args = self.stack.pop()
    if type(args) is not tuple or args:
      raise CheckpointError(f'The pickle uses opcode NEWOBJ with arguments '
                            f'{_short(args)}; only argparse.Namespace, with '
                            f'none, is made that way; refusing it.')
    cls = self.stack[-1]
    if cls is not self.load_state.namespace_class:
      raise CheckpointError(f'The pickle uses opcode NEWOBJ on '
                            f'{_short(cls)}; only argparse.Namespace is made '
                            f'that way; refusing it.')
    self.stack[-1] = PickledNamespace()

  def load_build(self):
    state = self.stack.pop()
    inst = target(self, (collections.OrderedDict, PickledNamespace), 'BUILD')
    ordered = type(inst) is collections.OrderedDict
    what = 'an OrderedDict' if ordered else 'an argparse.Namespace'
    if type(state) is not dict:
      raise CheckpointError(f'BUILD on {what} with state {_short(state)}: '
                            f'only a dict of attributes is allowed; refusing '
                            f'it.')
    # BUILD copies: a state reused from the memo must not copy for free.
    self.load_state.budget.charge(_BYTES_PER_OPCODE * len(state),
                                  'its pickle')
    shadowed = _CLASS_ATTRIBUTES[type(inst)]
    for key in state:
      # No attribute may shadow the class's (an OrderedDict's `items`). A
      # namespace keeps argparse's names (the `dest` of a positional
      # argument may be any string); an OrderedDict takes identifiers only.
      if (type(key) is not str or key.startswith('__') or key in shadowed
          or (ordered and not key.isidentifier())):
        raise CheckpointError(f'BUILD would set {_short(key)} on {what}; '
                              f'refusing it.')
    inst.__dict__.update(state)

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
                pickle.NEWOBJ[0]: load_newobj,
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
          f'to load it (only collections.OrderedDict, torch.*Storage, the '
          f'tensor and parameter rebuilders of torch._utils and '
          f'argparse.Namespace are allowed).')
    return allowed

  def persistent_load(self, pid: Any) -> np.ndarray:
    return self.load_state.storage(pid)


def _where(trail: Any) -> str:
  """`checkpoint['args'].lr[0]` from the linked trail `(how, key, parent)`."""
  steps = []
  while trail is not None:
    how, key, trail = trail
    steps.append({'item': f'[{_short(key)}]', 'attr': f'.{_clip(key)}',
                  'keys': '.keys()', 'member': ' (a member)'}[how])
  steps.reverse()
  if len(steps) > 20:
    steps[10:-10] = ['...']
  return 'checkpoint' + ''.join(steps)


def _check_data(obj: Any) -> None:
  """Refuses an unpickled object that holds anything but data.

  A pickle may place the load's stand-ins (the tensor rebuilders, the
  `OrderedDict` class, a storage type) anywhere a value goes, and fill a
  list or dict after a `BUILD` has copied it into a namespace; so the whole
  object is checked once, at the end. Each object and edge visited was made
  by an opcode already charged to the budget, so the walk is as bounded as
  the load; it is iterative (no recursion limit) and visits each container
  once (shared and self-referencing ones included).

  Raises:
    ValueError: naming where the first non-data value is.
  """
  seen = set()
  todo = [(obj, None)]
  while todo:
    value, trail = todo.pop()
    kind = type(value)
    if kind in _DATA_LEAVES:
      continue
    if kind not in _CONTAINERS:
      raise CheckpointError(
          f'The pickle puts {_short(value)} (a {kind.__name__}) at '
          f'{_where(trail)}, where a checkpoint holds only data: numbers, '
          f'strings, None, tensors and containers of them; refusing it.')
    if id(value) in seen:
      continue
    seen.add(id(value))
    if kind in (list, tuple):
      todo.extend((v, ('item', i, trail)) for i, v in enumerate(value))
      continue
    if kind in (set, frozenset):
      todo.extend((v, ('member', None, trail)) for v in value)
      continue
    if kind is not dict:  # Attributes set by BUILD.
      todo.extend((v, ('attr', k, trail)) for k, v in vars(value).items())
    if kind is not PickledNamespace:
      for k, v in value.items():
        todo.append((k, ('keys', None, trail)))
        todo.append((v, ('item', k, trail)))


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
      one small unit per pickle opcode and per attribute it sets); default
      4x the file's size plus 64 MiB, which a checkpoint that torch wrote
      (uncompressed) never needs.

  Returns:
    The pickled object (a state dict, `{'model': state_dict}`, or a whole
    training checkpoint with optimizer and scheduler state) with every
    tensor replaced by a `np.ndarray` and an `argparse.Namespace` by a
    `PickledNamespace` of its fields.

  Raises:
    FileNotFoundError: if there is no such file.
    IsADirectoryError: if `path` is a folder.
    ValueError: if the file is not such a zip (saying what it is instead:
      empty, truncated, the legacy format, a bare pickle), an entry is
      corrupt or encrypted, it would need more than `max_bytes`, or its
      pickle refers to anything but tensors, storages, `OrderedDict` and
      `argparse.Namespace`, or holds anything but data.
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
      obj = unpickler.load()
    except CheckpointError:
      raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError,
            IndexError, KeyError, LookupError, ValueError, struct.error,
            OverflowError, RecursionError) as e:
      raise CheckpointError(f'The pickle in {path} is corrupt: '
                            f'{type(e).__name__}: {_clip(e)}.') from None
  _check_data(obj)
  return obj
