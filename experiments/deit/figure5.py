r"""The paper's Figure 5 on a model trained here: where does attention go?

Figure 5 of the iRPE paper shows that in the first block of DeiT-S with
iRPE a query attends mostly to its neighbourhood, while in the last block
it does not. This trains two small ViTs on scikit-learn's digits upscaled to
16x16 and cut into an 8x8 grid of 2x2 patches (a grid large enough to show
locality; the demo's 4x4 is not): one with the absolute position embedding
only, one with absolute + contextual product iRPE on keys. For the first
and the last block it averages the attention over heads, all patch queries
and the test images, by relative offset (key - query), and writes

  figure5.png   mean attention by (row, column) offset, one panel per model
                and block, one colour scale;

and prints, for each panel, the share of attention within one patch of the
query (the 3x3 neighbourhood) against the share a uniform attention would
give it. Nothing is downloaded; about 3 minutes of CPU time (2 cores).

  python -m experiments.deit.figure5 [--out DIR] [--epochs N]
"""

import dataclasses
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

from absl import flags
import jax
import numpy as np

from experiments.deit import demo
from experiments.lib import cli
from irpe_jax import viz

SETTINGS = demo.Settings(upscale=2, patch_size=2, embed_dim=48, depth=3,
                         num_heads=3, epochs=15, num_seeds=1, batch_size=64,
                         base_lr=5e-3, warmup_epochs=1)
VARIANTS = ('abs', 'irpe_k')


def neighbourhood_share(by_offset: np.ndarray, radius: int = 1) -> float:
  """Mean attention within `radius` patches (Chebyshev) of the query."""
  rows, cols = by_offset.shape
  centre_r, centre_c = rows // 2, cols // 2
  return float(by_offset[centre_r - radius:centre_r + radius + 1,
                         centre_c - radius:centre_c + radius + 1].sum())


def uniform_share(grid: int, radius: int = 1) -> float:
  """The same share for uniform attention over the patches (and class token)."""
  weights = np.full((1, 1 + grid * grid, 1 + grid * grid),
                    1.0 / (1 + grid * grid))
  return neighbourhood_share(viz.attention_by_offset(weights, (grid, grid)),
                             radius)


COMMAND = cli.Command('python -m experiments.deit.figure5', __doc__)
flags.DEFINE_string('out', 'irpe_figure5', '', flag_values=COMMAND.flags)
flags.DEFINE_integer('epochs', SETTINGS.epochs, '', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'eval_images', 200, 'test images the attention is averaged over',
    flag_values=COMMAND.flags)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = COMMAND.namespace(argv)
  settings = dataclasses.replace(SETTINGS, epochs=args.epochs)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  data = demo.load_digits(upscale=settings.upscale)
  if settings.train_subset:
    data = (data[0][:settings.train_subset], data[1][:settings.train_subset],
            *data[2:])
  grid = data[0].shape[1] // settings.patch_size
  print(f'Digits at {data[0].shape[1]}px as {grid}x{grid} patches; '
        f'{settings.epochs} epochs per model.', flush=True)
  images = data[2][:args.eval_images]
  panels, shares, accuracy = {}, {}, {}
  for variant in VARIANTS:
    result = demo.train_variant(variant, settings, data, [0])
    params = jax.tree.map(lambda x: x[0], result['params'])
    accuracy[variant] = result['mean']
    weights = demo.attention_of(variant, settings, params, images)
    for block in (0, settings.depth - 1):
      label = (f'{demo.DESCRIPTIONS[variant]}\nblock {block + 1} of '
               f'{settings.depth}')
      panels[label] = viz.attention_by_offset(weights[block], (grid, grid))
      shares[label] = neighbourhood_share(panels[label])
  path = os.path.join(args.out, 'figure5.png')
  viz.plot_attention_by_offset(
      path, panels, f'Mean attention by offset from the query, {grid}x{grid} '
      f'digits, {len(images)} test images, all queries and heads')
  uniform = uniform_share(grid)
  print(f'\nShare of attention within one patch of the query (uniform: '
        f'{uniform:.3f}):')
  for label, share in shares.items():
    print(f'  {label.replace(chr(10), ", "):50s} {share:.3f} '
          f'({share / uniform:.1f}x uniform)')
  for variant in VARIANTS:
    print(f'test accuracy {variant}: {100 * accuracy[variant]:.1f}%')
  print(f'\nWrote {os.path.abspath(path)} in {time.time() - start:.0f}s.')
  return {'shares': shares, 'uniform': uniform, 'accuracy': accuracy,
          'path': path}


if __name__ == '__main__':
  main(sys.argv[1:])
