"""Converts the release's PyTorch DeiT and DETR checkpoints to Flax and back.

Names map one to one: `blocks.3.attn.rpe_k.lookup_table_weight` is
`params['blocks_3']['attn']['rpe_k']['lookup_table_weight']`. Layouts,
PyTorch -> Flax:

- Linear `weight (O, I)` -> Dense `kernel (I, O)` (transposed)
- Conv2d `weight (O, I, kh, kw)` -> Conv `kernel (kh, kw, I, O)`
- LayerNorm `weight (C,)` -> LayerNorm `scale (C,)`
- MultiheadAttention `in_proj_weight (3C, C)`, `in_proj_bias` ->
  `qkv/kernel (C, 3C)`, `qkv/bias`
- MultiheadAttention `out_proj` -> `proj`
- Embedding (`query_embed`) `weight (N, C)` -> `embedding (N, C)`
- batch norm `running_mean`, `running_var` -> `mean`, `var`
- iRPE `lookup_table_*`, `cls_token`, `pos_embed`, biases -> unchanged

MultiheadAttention is any module named `self_attn` or `multihead_attn` (as
in DETR); IRPEAttention holds its projections so. A state dict has one
namespace; a model may hold several collections (DETR keeps its frozen batch
norm in 'batch_stats'). Given a model, each tensor goes to the collection
that holds its path, and the whole variables dict is returned. A torchvision
ResNet state dict (`conv1.weight`, `layer1.0...`, `fc.*`) given with a DETR
loads into the model's backbone only, without `fc` and `num_batches_tracked`, as
the release starts training.

Two names that map to one Flax param, or a name that would be both a param
and a module, are errors. Reading a `.pth` needs no torch and runs no code
from the file (see `irpe_jax._torch_pickle`). Given a model, the params are
checked against it (`irpe_jax.models.check_params`, which names them here as
the file does) and a mismatch raises one error listing every missing,
unexpected and wrongly shaped tensor: nothing is half-loaded.

Command line:

    python -m irpe_jax.convert IN.pth OUT.msgpack [--model NAME] [--force]
    python -m irpe_jax.convert rpe-2.0-product-ctx-1-k.pth OUT.msgpack \
        --detr rpe-2.0-product-ctx-1-k
"""

import argparse
import contextlib
import os
import re
import secrets
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import numpy as np

from irpe_jax import _torch_pickle
from irpe_jax import models
from irpe_jax.models import params as params_lib

Params = Dict[str, Any]
_BLOCK_INDEX = re.compile(r'^(.+)_(\d+)$')
# Collections a state dict may fill, besides 'params'.
_COLLECTIONS = ('params', 'batch_stats')
# torch.nn.MultiheadAttention (DETR names its attentions so) packs q, k and v
# in `in_proj_*`; Flax holds them as a `qkv` Dense, as IRPEAttention does.
_MHA_MODULES = ('self_attn', 'multihead_attn')
_MHA_TO_FLAX = {'in_proj_weight': ('qkv', 'weight'),
                'in_proj_bias': ('qkv', 'bias')}
# nn.Embedding weights: `(N, C)` as they are, unlike a Linear's.
_EMBEDDINGS = ('query_embed',)
_BUFFERS_TO_FLAX = {'running_mean': 'mean', 'running_var': 'var'}
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
                  'var': 'running_var'}
# Top-level names of a torchvision ResNet state dict.
_TORCHVISION_RESNET = ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4',
                       'fc')
# Flax kernel axes -> PyTorch weight axes, by number of dimensions.
_TO_TORCH_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}
_TO_FLAX_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}


def _transpose(x: Any, axes: Sequence[int]) -> Any:
  """`np.transpose` that also takes `jax.ShapeDtypeStruct` values."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[a] for a in axes), x.dtype)
  return np.transpose(np.asarray(x), axes)


def _leaf_to_flax(name: str, value: Any) -> Tuple[str, Any]:
  """`(flax leaf name, value)` of a torch tensor name's last part."""
  if name != 'weight':
    return name, value
  ndim = len(value.shape)
  if ndim == 1:
    return 'scale', value
  if ndim in _TO_FLAX_AXES:
    return 'kernel', _transpose(value, _TO_FLAX_AXES[ndim])
  raise ValueError(f'A weight of shape {value.shape} is neither LayerNorm '
                   f'(1-D), Linear (2-D) nor Conv2d (4-D).')


def _leaf_to_torch(name: str, value: Any) -> Tuple[str, Any]:
  """Inverse of `_leaf_to_flax`."""
  if name == 'scale':
    return 'weight', value
  if name == 'kernel':
    ndim = len(value.shape)
    if ndim not in _TO_TORCH_AXES:
      raise ValueError(f'A kernel of shape {value.shape} is neither Dense '
                       f'(2-D) nor Conv (4-D).')
    return 'weight', _transpose(value, _TO_TORCH_AXES[ndim])
  return name, value


def _rename_to_flax(path: Tuple[str, ...]) -> Tuple[str, ...]:
  """MultiheadAttention, Embedding and batch-norm names -> Flax's."""
  *parents, leaf = path
  if parents and parents[-1] in _MHA_MODULES and leaf in _MHA_TO_FLAX:
    return (*parents, *_MHA_TO_FLAX[leaf])
  if len(parents) > 1 and parents[-2] in _MHA_MODULES and (
      parents[-1] == 'out_proj'):
    parents[-1] = 'proj'
  if parents and parents[-1] in _EMBEDDINGS and leaf == 'weight':
    return (*parents, 'embedding')
  return (*parents, _BUFFERS_TO_FLAX.get(leaf, leaf))


def _torch_name(path: Sequence[str]) -> str:
  """The release's tensor name of a Flax param path."""
  *parents, leaf = path
  leaf = _LEAF_TO_TORCH.get(leaf, leaf)
  if len(parents) > 1 and parents[-2] in _MHA_MODULES:
    if parents[-1] == 'qkv':
      parents, leaf = parents[:-1], f'in_proj_{leaf}'
    elif parents[-1] == 'proj':
      parents[-1] = 'out_proj'
  if parents and parents[-1] in _EMBEDDINGS and leaf == 'embedding':
    leaf = 'weight'
  names = []
  for part in parents:
    match = _BLOCK_INDEX.match(part)
    names.extend(match.groups() if match else (part,))
  return '.'.join(names + [leaf])


def _as_torch(path: Tuple[str, ...], shape: Tuple[int, ...]
              ) -> Tuple[str, Tuple[int, ...]]:
  """A Flax param's tensor name and shape in the release's checkpoints."""
  axes = _TO_TORCH_AXES.get(len(shape)) if path[-1] == 'kernel' else None
  return _torch_name(path), tuple(shape[a] for a in axes) if axes else shape


def _flax_path(name: Any) -> Tuple[str, ...]:
  """`blocks.0.attn.qkv` -> `('blocks_0', 'attn', 'qkv')` (leaf apart)."""
  if not isinstance(name, str) or not name or '' in name.split('.'):
    raise ValueError(f'Tensor names must be non-empty dotted names, got '
                     f'{name!r}.')
  path = []
  for part in name.split('.'):
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  return tuple(path)


def _check_one_to_one(names: Mapping[Tuple[str, ...], Sequence[str]],
                      kind: str) -> None:
  """Raises naming every two keys that share a slot or nest in each other.

  Args:
    names: each target path -> the source keys that map to it.
    kind: what the paths are, for the message.
  """
  problems = [f'{" and ".join(map(repr, keys))} all map to the {kind} '
              f'{"/".join(path)}' for path, keys in names.items()
              if len(keys) > 1]
  inner = {}
  for path, keys in names.items():
    for i in range(1, len(path)):
      inner.setdefault(path[:i], keys[0])
  problems += [f'{keys[0]!r} maps to the {kind} {"/".join(path)}, which '
               f'{inner[path]!r} needs as a module holding params'
               for path, keys in names.items() if path in inner]
  if problems:
    raise ValueError('Tensor names do not map one to one: '
                     + '; '.join(sorted(problems)) + '.')


def torch_to_flax(state_dict: Mapping[str, Any],
                  expected: Optional[Any] = None) -> Params:
  """Converts a release state dict to a Flax param tree.

  Args:
    state_dict: tensor name -> array (numpy, or anything `np.asarray`
      takes; `jax.ShapeDtypeStruct` values pass through), as
      `model.state_dict()` of the release, or torchvision's ResNet for a DETR
      `expected`.
    expected: optional model, or the params it expects (arrays or
      `jax.ShapeDtypeStruct` values, e.g. `models.expected_params(model)`),
      or its variables (`{'params': ..., 'batch_stats': ...}`), to check names
      and shapes against and take dtypes from.

  Returns:
    The nested `params` dict, as
    `model.apply({'params': params}, ...)` takes it; given a model with
    more collections than 'params' (DETR), or its variables, the variables dict
    `{'params': ..., 'batch_stats': ...}` (for a torchvision ResNet: the
    backbone's part of it only).

  Raises:
    ValueError: if two names map to one Flax param, or one name maps to a
      module that holds others (`blocks.0.attn` beside
      `blocks.0.attn.qkv.weight`); and, given `expected`, listing every
      missing, unexpected and wrongly shaped tensor.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(f'state_dict must be a mapping of tensor names to arrays, '
                    f'got {type(state_dict).__name__}.')
  prefix = ()
  if _is_torchvision_resnet(state_dict) and isinstance(expected, nn.Module):
    prefix = tuple(getattr(expected, 'backbone_path', ()))
  if prefix:  # What DETR's FrozenBatchNorm2d and IntermediateLayerGetter drop.
    state_dict = {k: v for k, v in state_dict.items()
                  if k.split('.')[0] != 'fc'
                  and not k.endswith('num_batches_tracked')}
  flat, sources = {}, {}
  for name, value in state_dict.items():
    if not isinstance(value, jax.ShapeDtypeStruct):
      value = np.asarray(value)
    path = _rename_to_flax(_flax_path(name))
    leaf, value = _leaf_to_flax(path[-1], value)
    path = prefix + path[:-1] + (leaf,)
    sources.setdefault(path, []).append(name)
    flat[path] = value
  _check_one_to_one(sources, 'Flax param')
  if expected is None:
    return flax.traverse_util.unflatten_dict(flat)
  return _check_against(flat, expected, prefix)


def _is_variables(tree: Any) -> bool:
  """Whether `tree` is `{'params': ..., 'batch_stats': ...}`, not params."""
  return (isinstance(tree, Mapping) and 'params' in tree
          and set(tree) <= set(_COLLECTIONS))


def _is_torchvision_resnet(state_dict: Mapping[str, Any]) -> bool:
  return 'conv1.weight' in state_dict and all(
      isinstance(k, str) and k.split('.')[0] in _TORCHVISION_RESNET
      for k in state_dict)


def _check_against(flat: Dict[Tuple[str, ...], Any], expected: Any,
                   prefix: Tuple[str, ...]) -> Params:
  """Checks converted tensors against a model, sorted into its collections.

  Args:
    flat: Flax path -> value, all collections in one namespace.
    expected: a model, its params or its variables.
    prefix: checks only the part of the model under this path (a backbone);
      errors then name tensors without it, as its file does.
  """
  if isinstance(expected, nn.Module):
    expected = params_lib.expected_variables(expected)
  expected = flax.core.unfreeze(expected)
  if not _is_variables(expected):
    expected = {'params': expected}
  want = {(c,) + p: v for c, tree in expected.items()
          for p, v in flax.traverse_util.flatten_dict(tree).items()
          if p[:len(prefix)] == prefix}
  owner = {p[1:]: p[0] for p in want}
  got = {(owner.get(p, 'params'),) + p: v for p, v in flat.items()}
  strip = len(_torch_name(prefix + ('_',))) - 1 if prefix else 0

  def describe(path, shape):
    name, shape = _as_torch(path[1:], shape)
    return name[strip:], shape

  if set(expected) == {'params'}:  # Named by Flax path: params only.
    unwrap = lambda t: flax.traverse_util.unflatten_dict(
        {p[1:]: v for p, v in t.items()})
    return params_lib.check_params(
        unwrap(got), unwrap(want),
        describe=lambda path, shape: describe(('params',) + path, shape))
  return params_lib.check_params(
      flax.traverse_util.unflatten_dict(got),
      flax.traverse_util.unflatten_dict(want), describe=describe)


def flax_to_torch(params: Params) -> Dict[str, Any]:
  """Converts Flax params to a release state dict, inverting `torch_to_flax`.

  Args:
    params: the `params` collection (a `{'params': ...}` wrapper is
      accepted too), or a model's variables
      `{'params': ..., 'batch_stats': ...}`, whose collections share the
      state dict.
      Leaves may be arrays or `jax.ShapeDtypeStruct` values.

  Returns:
    Tensor name -> numpy array (or `ShapeDtypeStruct`), in PyTorch layout;
    `torch.from_numpy` each to get a state dict for `load_state_dict`.

  Raises:
    ValueError: if two params map to one tensor name
      (`norm/scale` and `norm/weight`, or `blocks_0` and `blocks/0`).
  """
  params = flax.core.unfreeze(params)
  if _is_variables(params):
    flat = {p: v for c in params
            for p, v in flax.traverse_util.flatten_dict(params[c]).items()}
  else:
    flat = flax.traverse_util.flatten_dict(params)
  out, sources = {}, {}
  for path, value in flat.items():
    _, value = _leaf_to_torch(path[-1], value)
    if not isinstance(value, jax.ShapeDtypeStruct):
      value = np.asarray(value)
    name = _torch_name(path)
    sources.setdefault((name,), []).append('/'.join(path))
    out[name] = value
  _check_one_to_one(sources, 'tensor name')
  return out


def _state_dict_of(obj: Any, path: str) -> Mapping[str, Any]:
  """The state dict inside a loaded `.pth`: `obj['model']` or `obj` itself."""
  if isinstance(obj, Mapping) and 'model' in obj and isinstance(
      obj['model'], Mapping):
    obj = obj['model']
  if not isinstance(obj, Mapping) or not obj or not all(
      isinstance(k, str) and isinstance(v, np.ndarray)
      for k, v in obj.items()):
    raise ValueError(f'{path} holds no state dict (a mapping of tensor names '
                     f'to tensors, at the top or under "model").')
  return obj


def _read_npz(archive, path: str, max_bytes: Optional[int]
              ) -> Dict[str, np.ndarray]:
  """The arrays of an `.npz`, each size checked before it is allocated."""
  budget = _torch_pickle.default_budget(path, max_bytes)
  infos = archive.infolist()
  if any(i.filename.startswith('state/') for i in infos):
    infos = [i for i in infos if i.filename.startswith('state/')]
  arrays = {}
  for info in infos:
    with _torch_pickle.zip_errors(path, info):
      with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (
            1, 0) else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        header = f.tell()
      if dtype.kind not in 'biufc' or dtype.hasobject:
        raise _torch_pickle.CheckpointError(
            f'{path}: {info.filename} holds dtype {dtype}, not numbers.')
      nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
      if header + nbytes != info.file_size:
        raise _torch_pickle.CheckpointError(
            f'{path}: {info.filename} declares {shape} {dtype} '
            f'({nbytes:,} bytes) but holds {info.file_size - header:,}: '
            f'it is corrupt.')
      budget.charge(nbytes, f'{info.filename} ({nbytes:,} bytes)')
      with archive.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
    name = info.filename[:-len('.npy')]
    arrays[name[len('state/'):] if name.startswith('state/') else name] = (
        array)
  return arrays


def read_state_dict(path: str, *, max_bytes: Optional[int] = None
                    ) -> Dict[str, np.ndarray]:
  """Reads the tensors of a `.pth` or `.npz` checkpoint as numpy arrays.

  The format is told from the content: a `torch.save` zip (`data.pkl`
  inside), or a numpy `.npz` whose keys are tensor names, optionally under
  `state/` (other keys are then ignored).

  Args:
    path: the checkpoint.
    max_bytes: the most bytes reading may allocate; see
      `irpe_jax._torch_pickle.load_pth`.

  Raises:
    FileNotFoundError, IsADirectoryError: if `path` is no file.
    ValueError: if the file is neither format (saying what it is: empty,
      a truncated zip, PyTorch's legacy format, ...), is corrupt, unsafe or
      larger than `max_bytes`.
  """
  path = os.fspath(path)
  with _torch_pickle.open_zip(path) as archive:
    names = archive.namelist()
    if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
      obj = _torch_pickle.load_pth(path, max_bytes=max_bytes)
      return dict(_state_dict_of(obj, path))
    if names and all(n.endswith('.npy') for n in names):
      return _read_npz(archive, path, max_bytes)
  raise ValueError(f'{path} is a zip but neither a PyTorch checkpoint '
                   f'(data.pkl) nor a numpy .npz.')


def load_torch_checkpoint(path: str, model: Optional[nn.Module] = None,
                          expected: Optional[Params] = None, *,
                          max_bytes: Optional[int] = None) -> Params:
  """Loads a release checkpoint (`.pth` or `.npz`) as Flax params.

  Args:
    path: a checkpoint of the release (`torch.save({'model': state_dict})`,
      or a bare state dict) or an `.npz` state dict; for a DETR also
      torchvision's ResNet ImageNet weights.
    model: checks names and shapes against this model (its `img_size` sets
      the expected `pos_embed`).
    expected: or against these params (arrays or `ShapeDtypeStruct` values).
    max_bytes: the most bytes reading may allocate (default: a few times
      the file's size).

  Returns:
    The `params` tree, complete or not at all; for a DETR its variables
    `{'params': ..., 'batch_stats': ...}` (frozen batch norm included), or
    for torchvision's ResNet the backbone's part of them (see
    `irpe_jax.models.detr.init_variables`).

  Raises:
    ValueError: see `read_state_dict` and `torch_to_flax`.
  """
  if model is not None and expected is not None:
    raise ValueError('Give model or expected, not both.')
  state = read_state_dict(path, max_bytes=max_bytes)
  return torch_to_flax(state, model if model is not None else expected)


def _write_atomically(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same folder.

  Readers see the old file or the whole new one, never a truncated one,
  whatever interrupts the write. A symlink is written through.
  """
  path = os.path.realpath(path)
  folder, base = os.path.split(path)
  while True:
    temp = os.path.join(folder, f'.{base}.{secrets.token_hex(6)}.tmp')
    try:  # 0o666 minus the umask, as open() would give.
      fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
      break
    except FileExistsError:
      continue
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temp)
    raise


def save_params(path: str, params: Params) -> None:
  """Writes params as msgpack (`flax.serialization`), atomically.

  The bytes are written to a temporary file beside `path` and renamed onto
  it, so an interrupted save leaves the previous file (if any) intact.
  """
  state = jax.tree.map(np.asarray, flax.core.unfreeze(params))
  _write_atomically(os.fspath(path), flax.serialization.msgpack_serialize(
      state))


def load_params(path: str, model: Optional[nn.Module] = None) -> Params:
  """Loads params from a Flax msgpack file, a `.pth` or an `.npz`.

  Args:
    path: a file from `save_params` / this module's command line, or a
      checkpoint `load_torch_checkpoint` reads.
    model: optional model to check names and shapes against.

  Returns:
    The `params` tree.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    head = f.read(4)
  if head.startswith(b'PK'):
    return load_torch_checkpoint(path, model)
  with open(path, 'rb') as f:
    try:
      params = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types.
      raise ValueError(f'{path} is neither a Flax msgpack file nor a '
                       f'.pth/.npz checkpoint: {e}.') from None
  if not isinstance(params, dict) or not params:
    raise ValueError(f'{path} holds a {type(params).__name__!r} object, not '
                     f'a Flax param tree.')
  if model is not None:
    return params_lib.check_params(params, model)
  return params


def _check_output(source: str, target: str, force: bool) -> None:
  """Refuses to write over the input, a folder or (unless forced) a file."""
  if os.path.exists(source) and (
      os.path.realpath(source) == os.path.realpath(target) or (
          os.path.exists(target) and os.path.samefile(source, target))):
    raise ValueError(f'{target} is the input file; write the params to '
                     f'another path.')
  if os.path.isdir(target):
    raise IsADirectoryError(f'{target} is a folder; give a file path for '
                            f'the params.')
  folder = os.path.dirname(os.path.abspath(target))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{folder}: no such folder for the output.')
  if os.path.lexists(target) and not force:
    raise FileExistsError(f'{target} exists; pass --force to overwrite it.')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (0, or 1 on any bad input)."""
  parser = argparse.ArgumentParser(
      prog='python -m irpe_jax.convert',
      description='Converts a release .pth (or .npz) checkpoint to a Flax '
      'msgpack file of params.')
  parser.add_argument('input', help='release checkpoint, .pth or .npz')
  parser.add_argument('output', help='Flax params file to write (msgpack)')
  parser.add_argument('--model', help='registered model name to check the '
                      'checkpoint against, e.g. '
                      'deit_small_patch16_224_ctx_product_50_shared_k')
  parser.add_argument('--detr', metavar='ENC_RPE2D', default=None,
                      help="check the checkpoint against the release's DETR "
                      "with this encoder iRPE, e.g. rpe-2.0-product-ctx-1-k "
                      "('' for plain DETR), and write its variables")
  parser.add_argument('--force', action='store_true',
                      help='overwrite the output file if it exists')
  parser.add_argument('--max-bytes', type=int, default=None,
                      help='most bytes reading may allocate (default: 4x '
                      'the file size plus 64 MiB)')
  parser.add_argument('--log_level', default='info',
                      choices=('debug', 'info', 'warning', 'error'),
                      help='debug: a traceback for errors')
  def usage_error(message):  # One line, as for every other bad input.
    print(f'error: {message} (see --help)', file=sys.stderr)
    sys.exit(2)
  parser.error = usage_error
  args = parser.parse_args(argv)
  try:
    _check_output(args.input, args.output, args.force)
    if args.model and args.detr is not None:
      raise ValueError('Give --model or --detr, not both.')
    model = models.create_model(args.model) if args.model else None
    if args.detr is not None:
      model = models.DETR(enc_rpe2d=args.detr)
    params = load_torch_checkpoint(args.input, model,
                                   max_bytes=args.max_bytes)
    save_params(args.output, params)
  except (ValueError, TypeError, OSError, MemoryError) as e:
    if args.log_level == 'debug':
      raise
    message = ' '.join(line.strip() for line in str(e).splitlines())
    print(f'error: {message or type(e).__name__}', file=sys.stderr)
    return 1
  count = sum(np.size(x) for x in jax.tree.leaves(params))
  name = args.model or f'DETR {args.detr or "without iRPE"}'
  checked = f'checked against {name}' if model else 'unchecked'
  print(f'Wrote {count:,} parameters ({checked}) to {args.output}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
