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

Run with a torch install (not a dependency of irpe_jax), from the repository
root:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python tests/data/make_torch_reference.py
"""

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
  print(f'torch {torch.__version__}: wrote {len(out)} reference arrays.')


if __name__ == '__main__':
  main()
