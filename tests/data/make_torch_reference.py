"""Writes the PyTorch reference files that tests/test_torch_pickle.py reads.

The reader of `.pth` files (`irpe_jax._torch_pickle`) must agree with
`torch.load`, but CI has no torch. So torch writes, once, small checkpoints
and what `torch.load` makes of them, and the files are committed:

- `torch_reference.pth`: `torch.save` (default zip format, pickle protocol
  2) of a nested object: the `{'model': state_dict}` wrapper of a small
  module (Linear, Conv2d, LayerNorm, an `nn.Parameter` with Python
  attributes), every dtype the reader maps, non-contiguous, offset and
  0-stride views, views sharing one storage, 0-d and empty tensors, dicts
  and OrderedDicts nested in each other.
- `torch_reference_protocol4.pth`: the same object with `pickle_protocol=4`
  (frames, MEMOIZE, SHORT_BINUNICODE); torch's own `weights_only` loader
  refuses that protocol, `torch.load(..., weights_only=False)` reads it
  back equal.
- `torch_reference.npz`: `torch.load(..., weights_only=True)` of it,
  flattened: `value/PATH` is the tensor at PATH (keys joined by '/';
  bfloat16 as its uint16 bits), `dtype/PATH` the torch dtype's name and
  `container/PATH` the type of each dict (`dict` or `OrderedDict`).
- `legacy_format.pth`: a state dict in the pre-1.6 non-zip format
  (`_use_new_zipfile_serialization=False`), which the reader must name.
- `full_training_checkpoint.pth`: what DETR's `main.py` saves every epoch,
  `{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}`, for a tiny
  model: an AdamW state after one step with DETR's two parameter groups
  (int keys, float/bool/None fields, `betas` tuples), a StepLR state, and the
  `argparse.Namespace` of a parsed command line.
- `full_training_checkpoint.npz`: `torch.load` of it (`weights_only=False`:
  the file is ours): `value/PATH` for every tensor (int keys and list
  indices as path parts), and `structure`, the text `describe` gives of the
  whole object, with tensors as `tensor(PATH: DTYPE)`.

Run with a torch install (not a dependency of irpe_jax), from the repository
root:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python tests/data/make_torch_reference.py
"""

import argparse
import collections
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class _Small(torch.nn.Module):
  """A module with the layer kinds of a DeiT checkpoint."""

  def __init__(self):
    super().__init__()
    self.fc = torch.nn.Linear(3, 4)
    self.conv = torch.nn.Conv2d(2, 3, (2, 1))
    self.norm = torch.nn.LayerNorm(4)
    self.table = torch.nn.Parameter(torch.randn(1, 4, 5))


def reference_object():
  torch.manual_seed(0)
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  shared = torch.randn(4, 6)
  tagged = torch.nn.Parameter(torch.randn(3))
  tagged.note = 'a Python attribute: saved with _rebuild_parameter_with_state'
  tensors = {
      'float32': torch.randn(2, 3),
      'float64': torch.randn(3, dtype=torch.float64),
      'float16': torch.randn(2, 2).half(),
      'bfloat16': torch.randn(3, 4).bfloat16(),
      'int64': torch.arange(-3, 4),
      'int32': torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
      'int16': torch.tensor([-7, 300], dtype=torch.int16),
      'int8': torch.tensor([-128, 127], dtype=torch.int8),
      'uint8': torch.tensor([0, 255], dtype=torch.uint8),
      'bool': torch.tensor([[True, False], [False, True]]),
      'complex64': torch.randn(2, dtype=torch.complex64),
      'scalar': torch.tensor(3.5),
      'empty': torch.zeros(0, 3),
      'transposed': base.t(),
      'offset_strided': base[2:5, 1::3],
      'expanded': torch.arange(3.0).expand(4, 3),
      'permuted': torch.randn(2, 3, 4).permute(2, 0, 1),
  }
  views = {'whole': shared, 'rows': shared[1:3], 'column': shared[:, 4],
           'flipped': shared.t()[::2]}
  return {
      'model': _Small().state_dict(),
      'tensors': tensors,
      'shared': views,
      'nested': collections.OrderedDict(
          outer={'inner': collections.OrderedDict(leaf=torch.ones(2, 1))}),
      'parameter': torch.nn.Parameter(torch.randn(2, 2)),
      'tagged_parameter': tagged,
  }


def flatten(obj, prefix, out):
  """Tensors and container types of a loaded object, by '/'-joined path."""
  if isinstance(obj, dict):
    out[f'container/{prefix}'] = np.array(type(obj).__name__)
    for key, value in obj.items():
      flatten(value, f'{prefix}/{key}' if prefix else key, out)
    return
  assert isinstance(obj, torch.Tensor), (prefix, type(obj))
  tensor = obj.detach()
  out[f'dtype/{prefix}'] = np.array(str(tensor.dtype).replace('torch.', ''))
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.view(torch.int16)  # numpy has no bfloat16: keep bits.
  out[f'value/{prefix}'] = tensor.numpy()


class _FrozenBatchNorm2d(torch.nn.Module):
  """DETR's backbone norm: statistics and affine terms are buffers."""

  def __init__(self, n):
    super().__init__()
    for name, init in (('weight', torch.ones), ('bias', torch.zeros),
                       ('running_mean', torch.zeros),
                       ('running_var', torch.ones)):
      self.register_buffer(name, init(n))

  def forward(self, x):
    scale = self.weight * (self.running_var + 1e-5).rsqrt()
    shift = self.bias - self.running_mean * scale
    return x * scale[:, None, None] + shift[:, None, None]


class _TinyDetr(torch.nn.Module):
  """A few layers named as in DETR: a backbone, queries and a class head."""

  def __init__(self):
    super().__init__()
    self.backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 1, bias=False), _FrozenBatchNorm2d(2))
    self.query_embed = torch.nn.Embedding(2, 3)
    self.class_embed = torch.nn.Linear(3, 2)

  def forward(self, images):
    features = self.backbone(images).mean((2, 3))  # (B, 2)
    queries = self.query_embed.weight + features[:, None, :1]
    return self.class_embed(queries)


def _command_line():
  """An `argparse.Namespace` as DETR's parser makes it (a few fields)."""
  parser = argparse.ArgumentParser()
  parser.add_argument('--lr', default=1e-4, type=float)
  parser.add_argument('--lr_backbone', default=1e-5, type=float)
  parser.add_argument('--epochs', default=300, type=int)
  parser.add_argument('--lr_drop', default=200, type=int)
  parser.add_argument('--frozen_weights', type=str, default=None)
  parser.add_argument('--backbone', default='resnet50', type=str)
  parser.add_argument('--aux_loss', action='store_true')
  parser.add_argument('--enc_rpe2d', default='', type=str)
  parser.add_argument('--milestones', nargs='+', type=int, default=[])
  return parser.parse_args([
      '--aux_loss', '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k',
      '--milestones', '100', '200'])


def full_training_checkpoint():
  """What DETR's `main.py` saves after an epoch, for a tiny model."""
  torch.manual_seed(0)
  args = _command_line()
  model = _TinyDetr()
  param_dicts = [  # As DETR's main.py: the backbone learns more slowly.
      {'params': [p for n, p in model.named_parameters()
                  if 'backbone' not in n]},
      {'params': [p for n, p in model.named_parameters() if 'backbone' in n],
       'lr': args.lr_backbone},
  ]
  optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=1e-4)
  lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
  model(torch.randn(2, 3, 2, 2)).square().sum().backward()
  optimizer.step()
  lr_scheduler.step()
  return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
          'lr_scheduler': lr_scheduler.state_dict(), 'epoch': 0,
          'args': args}


def describe(obj, path='', tensors=None):
  """A canonical text of a loaded object; collects its tensors by path.

  Containers show their type (`OrderedDict{...}`) and attributes set on
  them (`_metadata`); a tensor is `tensor(PATH: DTYPE)` and goes to
  `tensors[PATH]`; numbers, strings, bools and None are their `repr`.
  tests/test_torch_pickle.py writes the same text for what the torch-free
  reader loads.
  """
  tensors = {} if tensors is None else tensors
  sub = lambda key, value: describe(value, f'{path}/{key}' if path else
                                    str(key), tensors)
  if isinstance(obj, torch.Tensor):
    tensors[path] = obj.detach()
    return f"tensor({path}: {str(obj.dtype).replace('torch.', '')})"
  if isinstance(obj, argparse.Namespace):
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


def write_full_training_checkpoint():
  path = os.path.join(HERE, 'full_training_checkpoint.pth')
  torch.save(full_training_checkpoint(), path)
  tensors = {}
  out = {'structure': np.array(describe(torch.load(path, weights_only=False),
                                        '', tensors))}
  for name, tensor in tensors.items():
    out[f'value/{name}'] = tensor.numpy()
  np.savez_compressed(os.path.join(HERE, 'full_training_checkpoint.npz'),
                      **out)
  return len(tensors)


def main():
  obj = reference_object()
  path = os.path.join(HERE, 'torch_reference.pth')
  torch.save(obj, path)
  torch.save(obj, os.path.join(HERE, 'torch_reference_protocol4.pth'),
             pickle_protocol=4)
  loaded = torch.load(path, weights_only=True)
  out = {}
  flatten(loaded, '', out)
  np.savez(os.path.join(HERE, 'torch_reference.npz'), **out)
  torch.save(collections.OrderedDict(weight=torch.ones(2, 3)),
             os.path.join(HERE, 'legacy_format.pth'),
             _use_new_zipfile_serialization=False)
  count = write_full_training_checkpoint()
  print(f'torch {torch.__version__}: wrote {len(out)} reference arrays and '
        f'a training checkpoint of {count} tensors.')


if __name__ == '__main__':
  main()
