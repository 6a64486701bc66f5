r"""DETR training step with iRPE against plain DETR, side by side.

  python -m experiments.detr.bench [--sizes 256x256,800x1088] [--batch 1]
      [--repeats 3] [--rpe rpe-2.0-product-ctx-1-k]

For each padded image size, compiles and times the full training step
(ResNet-50 DETR, matching, losses on every layer, AdamW) for plain DETR and
with iRPE, interleaving their repeats so that a load change on the machine
hits both, and prints compile seconds, median step seconds and the ratio
(the iRPE paper's goal: iRPE-K costs at most a few percent more).
"""

import argparse
import functools
import time
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import steps as base_steps
from experiments.detr import steps
from irpe_jax.models import detr


def _batch(batch: int, height: int, width: int, objects: int = 4
           ) -> Dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, objects, 2)),
                          rng.uniform(0.05, 0.3, (batch, objects, 2))], -1)
  return {'images': jnp.asarray(rng.normal(size=(batch, height, width, 3)),
                                jnp.float32),
          'pixel_mask': jnp.zeros((batch, height, width), bool),
          'labels': jnp.asarray(rng.integers(1, 91, (batch, objects)),
                                jnp.int32),
          'boxes': jnp.asarray(boxes, jnp.float32),
          'valid': jnp.ones((batch, objects), bool)}


def bench(sizes: Sequence[Sequence[int]], batch: int, repeats: int,
          rpe: str) -> Dict:
  """`{(h, w): {name: (compile_s, step_s)}}` for plain DETR and `rpe`."""
  recipe = steps.DetrRecipe()
  results = {}
  for height, width in sizes:
    data = _batch(batch, height, width)
    runs = {}
    for name, spec in (('plain', ''), (rpe, rpe)):
      model = detr.DETR(enc_rpe2d=spec, dropout_rate=0.0)
      variables = detr.init_variables(model, jax.random.key(0))
      state = base_steps.init_state(variables['params'], recipe,
                                    jax.random.key(1))
      state['batch_stats'] = variables['batch_stats']
      start = time.perf_counter()
      step = jax.jit(functools.partial(steps.train_step, model=model,
                                       recipe=recipe)).lower(
                                           state, data).compile()
      runs[name] = [step, state, time.perf_counter() - start, []]
      jax.block_until_ready(step(state, data))  # warm-up.
    for _ in range(repeats):
      for run in runs.values():
        start = time.perf_counter()
        jax.block_until_ready(run[0](run[1], data))
        run[3].append(time.perf_counter() - start)
    results[(height, width)] = {n: (r[2], float(np.median(r[3])))
                                for n, r in runs.items()}
  return results


def main(argv: Sequence[str] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='256x256,800x1088')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--rpe', default='rpe-2.0-product-ctx-1-k')
  args = parser.parse_args(argv)
  sizes = [tuple(map(int, s.split('x'))) for s in args.sizes.split(',')]
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, '
        f'batch {args.batch}, ResNet-50 DETR training step')
  print(f'{"size":>10s} {"tokens":>6s} {"model":>24s} {"compile s":>9s} '
        f'{"step s":>8s} {"ratio":>6s}')
  for (h, w), runs in bench(sizes, args.batch, args.repeats,
                            args.rpe).items():
    tokens = -(-h // 32) * -(-w // 32)
    plain = runs['plain'][1]
    for name, (compile_s, step_s) in runs.items():
      print(f'{h}x{w:<5d} {tokens:6d} {name:>24s} {compile_s:9.1f} '
            f'{step_s:8.3f} {step_s / plain:6.3f}')


if __name__ == '__main__':
  main()
