"""Converts the release's PyTorch DeiT-iRPE checkpoints to Flax and back.

Names map one to one: `blocks.3.attn.rpe_k.lookup_table_weight` is
`params['blocks_3']['attn']['rpe_k']['lookup_table_weight']`. Layouts:

| PyTorch | Flax |
|---|---|
| Linear `weight (O, I)` | Dense `kernel (I, O)` (transposed) |
| Conv2d `weight (O, I, kh, kw)` | Conv `kernel (kh, kw, I, O)` |
| LayerNorm `weight (C,)` | LayerNorm `scale (C,)` |
| iRPE `lookup_table_*`, `cls_token`, `pos_embed`, biases | unchanged |

Reading a `.pth` needs no torch and runs no code from the file (see
`irpe_jax._torch_pickle`). Given a model, a checkpoint is checked against
the model's parameter shapes first, and a mismatch raises one error listing
every missing, unexpected and wrongly shaped tensor: nothing is half-loaded.

Command line:

    python -m irpe_jax.convert IN.pth OUT.msgpack [--model NAME]
"""

import argparse
import re
import sys
import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax import _torch_pickle

Params = Dict[str, Any]
_BLOCK_INDEX = re.compile(r'^(.+)_(\d+)$')


def _transpose(x: Any, axes: Sequence[int]) -> Any:
  """`np.transpose` that also takes `jax.ShapeDtypeStruct`s."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[a] for a in axes), x.dtype)
  return np.transpose(np.asarray(x), axes)


def _leaf_to_flax(name: str, value: Any):
  """`(flax leaf name, value)` of a torch tensor name's last part."""
  if name != 'weight':
    return name, value
  ndim = len(value.shape)
  if ndim == 1:
    return 'scale', value
  if ndim == 2:
    return 'kernel', _transpose(value, (1, 0))
  if ndim == 4:
    return 'kernel', _transpose(value, (2, 3, 1, 0))
  raise ValueError(f'A weight of shape {value.shape} is neither LayerNorm '
                   f'(1-D), Linear (2-D) nor Conv2d (4-D).')


def _leaf_to_torch(name: str, value: Any):
  """Inverse of `_leaf_to_flax`."""
  if name == 'scale':
    return 'weight', value
  if name == 'kernel':
    ndim = len(value.shape)
    if ndim == 2:
      return 'weight', _transpose(value, (1, 0))
    if ndim == 4:
      return 'weight', _transpose(value, (3, 2, 0, 1))
    raise ValueError(f'A kernel of shape {value.shape} is neither Dense '
                     f'(2-D) nor Conv (4-D).')
  return name, value


def torch_to_flax(state_dict: Mapping[str, Any],
                  expected: Optional[Params] = None) -> Params:
  """Converts a release state dict to a Flax param tree.

  Args:
    state_dict: tensor name -> array (numpy, or anything `np.asarray`
      takes; `jax.ShapeDtypeStruct`s pass through), as `model.state_dict()`
      of the release.
    expected: optional params (arrays or `jax.ShapeDtypeStruct`s, for
      example `expected_params(model)`) to check names and shapes against
      and to take dtypes from.

  Returns:
    The nested `params` dict for `model.apply({'params': params}, ...)`.

  Raises:
    ValueError: listing every missing, unexpected and wrongly shaped tensor
      when `expected` is given and differs.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(f'state_dict must be a mapping of tensor names to arrays, '
                    f'got {type(state_dict).__name__}.')
  flat = {}
  for name, value in state_dict.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f'Tensor names must be non-empty strings, got '
                       f'{name!r}.')
    if not isinstance(value, jax.ShapeDtypeStruct):
      value = np.asarray(value)
    parts = name.split('.')
    path = []
    for part in parts[:-1]:
      if part.isdigit() and path:
        path[-1] = f'{path[-1]}_{part}'
      else:
        path.append(part)
    leaf, value = _leaf_to_flax(parts[-1], value)
    flat[tuple(path) + (leaf,)] = value
  if expected is not None:
    flat = _check_against(flat, expected)
  return flax.traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Params) -> Dict[str, Any]:
  """Converts Flax params to a release state dict, inverting `torch_to_flax`.

  Args:
    params: the `params` collection (a `{'params': ...}` wrapper is
      accepted too). Leaves may be arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    Tensor name -> numpy array (or `ShapeDtypeStruct`), in PyTorch layout;
    `torch.from_numpy` each to get a state dict for `load_state_dict`.
  """
  params = flax.core.unfreeze(params)
  if set(params) == {'params'}:
    params = params['params']
  out = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    _, value = _leaf_to_torch(path[-1], value)
    if not isinstance(value, jax.ShapeDtypeStruct):
      value = np.asarray(value)
    out[_torch_name(path)] = value
  return out


def _torch_name(path: Sequence[str]) -> str:
  """The release's tensor name of a Flax param path."""
  names = []
  for part in path[:-1]:
    match = _BLOCK_INDEX.match(part)
    names.extend(match.groups() if match else (part,))
  leaf = {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])
  return '.'.join(names + [leaf])


def expected_params(model: nn.Module) -> Params:
  """`jax.ShapeDtypeStruct` params of a `VisionTransformer`, without init."""
  size = model.img_size
  rows, cols = (size, size) if isinstance(size, int) else size
  images = jax.ShapeDtypeStruct((1, rows, cols, model.in_chans), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return flax.core.unfreeze(variables['params'])


def _check_against(flat: Dict[tuple, np.ndarray], expected: Params
                   ) -> Dict[tuple, np.ndarray]:
  """Casts `flat` to `expected`'s dtypes; raises listing every mismatch."""
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected))
  missing = sorted(_torch_name(p) for p in want.keys() - flat.keys())
  unexpected = sorted(_torch_name(p) for p in flat.keys() - want.keys())
  torch_shape = lambda p, x: tuple(_leaf_to_torch(p[-1], x)[1].shape)
  wrong = sorted(
      f'{_torch_name(p)}: checkpoint {torch_shape(p, flat[p])}, model '
      f'{torch_shape(p, want[p])}'
      for p in flat.keys() & want.keys() if flat[p].shape != want[p].shape)
  if missing or unexpected or wrong:
    lines = ['The checkpoint does not fit the model:']
    for title, items in (('missing', missing), ('unexpected', unexpected),
                         ('wrong shape', wrong)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items))
    got, need = flat.get(('pos_embed',)), want.get(('pos_embed',))
    if (got is not None and need is not None and got.shape != need.shape
        and got.shape[-1] == need.shape[-1]):
      lines.append('  (for another resolution, resample pos_embed with '
                   'irpe_jax.models.resample_posemb)')
    raise ValueError('\n'.join(lines))
  return {p: v if isinstance(v, jax.ShapeDtypeStruct) else v.astype(
      want[p].dtype) for p, v in flat.items()}


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


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    keys = [k for k in data.files if k.startswith('state/')]
    if keys:
      return {k[len('state/'):]: data[k] for k in keys}
    return {k: data[k] for k in data.files}


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads the tensors of a `.pth` or `.npz` checkpoint as numpy arrays.

  The format is told from the content: a `torch.save` zip (`data.pkl`
  inside), or a numpy `.npz` whose keys are tensor names, optionally under
  `state/` (other keys are then ignored).

  Raises:
    ValueError: if the file is neither, or is truncated or unsafe.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path} is not a checkpoint: expected a PyTorch .pth '
                     f'(zip format) or a numpy .npz, and it is not a zip.')
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except zipfile.BadZipFile as e:
    raise ValueError(f'{path} is a corrupt zip: {e}.') from None
  if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
    return dict(_state_dict_of(_torch_pickle.load_pth(path), path))
  if names and all(n.endswith('.npy') for n in names):
    try:
      return _read_npz(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise ValueError(f'{path} is a corrupt .npz: {e}.') from None
  raise ValueError(f'{path} is a zip but neither a PyTorch checkpoint '
                   f'(data.pkl) nor a numpy .npz.')


def load_torch_checkpoint(path: str, model: Optional[nn.Module] = None,
                          expected: Optional[Params] = None) -> Params:
  """Loads a release checkpoint (`.pth` or `.npz`) as Flax params.

  Args:
    path: a checkpoint of the release (`torch.save({'model': state_dict})`,
      or a bare state dict) or an `.npz` state dict.
    model: checks names and shapes against this model (its `img_size` sets
      the expected `pos_embed`).
    expected: or against these params (arrays or `ShapeDtypeStruct`s).

  Returns:
    The `params` tree, complete or not at all.
  """
  if model is not None and expected is not None:
    raise ValueError('Give model or expected, not both.')
  if model is not None:
    expected = expected_params(model)
  return torch_to_flax(read_state_dict(path), expected)


def save_params(path: str, params: Params) -> None:
  """Writes params as msgpack (`flax.serialization`)."""
  state = jax.tree.map(np.asarray, flax.core.unfreeze(params))
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(state))


def load_params(path: str, model: Optional[nn.Module] = None) -> Params:
  """Loads params from a Flax msgpack file, a `.pth` or an `.npz`.

  Args:
    path: a file from `save_params` / this module's command line, or a
      checkpoint `load_torch_checkpoint` reads.
    model: optional model to check names and shapes against.

  Returns:
    The `params` tree.
  """
  if zipfile.is_zipfile(path):
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
    # Same names and checks as a torch checkpoint.
    return torch_to_flax(flax_to_torch(params), expected_params(model))
  return params


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m irpe_jax.convert',
      description='Converts a release .pth (or .npz) checkpoint to a Flax '
      'msgpack file of params.')
  parser.add_argument('input', help='release checkpoint, .pth or .npz')
  parser.add_argument('output', help='Flax params file to write (msgpack)')
  parser.add_argument('--model', help='registered model name to check the '
                      'checkpoint against, e.g. '
                      'deit_small_patch16_224_ctx_product_50_shared_k')
  args = parser.parse_args(argv)
  model = None
  if args.model:
    from irpe_jax import models  # pylint: disable=g-import-not-at-top
    model = models.create_model(args.model)
  try:
    params = load_torch_checkpoint(args.input, model)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  save_params(args.output, params)
  count = sum(np.size(x) for x in jax.tree.leaves(params))
  checked = f'checked against {args.model}' if model else 'unchecked'
  print(f'Wrote {count:,} parameters ({checked}) to {args.output}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
