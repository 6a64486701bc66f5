r"""Training-step throughput of DeiT-S: plain, iRPE-K and iRPE-QKV.

  python -m experiments.bench_train [--batch 16] [--steps 1] [--rounds 10]
      [--impl auto[,onehot,...]] [--depth 12]

One full training step of each model at 224px on random data, in one
process: `experiments.steps.train_step`, the step of the training runs
(forward, backward, AdamW update, drop path on). Every round runs each
model once, in a shuffled order, so that a busy machine slows them alike.
Prints each model's best round as images/s, and its cost over plain DeiT-S
two ways: best against best, and the median over rounds of the ratio to
plain DeiT-S in the same round (the targets are judged on this one: load
that drifts between rounds cancels in it). Also the first-step (compile)
time and XLA's peak memory of the compiled step (arguments, outputs and
temporaries, less what donation aliases).

The paper's efficient iRPE aims at a small overhead; targets here: iRPE-K at
most 3% over plain DeiT-S, iRPE-QKV at most 10%.
"""

import argparse
import functools
import sys
import time
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import steps
from irpe_jax import models

MODELS = (
    ('DeiT-S', 'deit_small_patch16_224'),
    ('DeiT-S + iRPE-K', 'deit_small_patch16_224_ctx_product_50_shared_k'),
    ('DeiT-S + iRPE-QKV', 'deit_small_patch16_224_ctx_product_50_shared_qkv'),
)
TARGETS = {'DeiT-S + iRPE-K': 0.03, 'DeiT-S + iRPE-QKV': 0.10}


def make_step(name: str, batch: int, image_size: int, impl: str,
              dtype: Any, depth: int = 12) -> Dict[str, Any]:
  """Compiles `experiments.steps.train_step` for model `name`.

  The step of the training runs, with their switches set for a clean
  measurement: no label smoothing and no mixup (they cost next to nothing),
  drop path on, AdamW on a warm-up + cosine schedule.

  Returns:
    The compiled step, its state and batch, the first-step time and XLA's
    peak memory.
  """
  model = models.create_model(name, drop_path_rate=0.1, impl=impl,
                              img_size=image_size, dtype=dtype, depth=depth)
  recipe = steps.Recipe(peak_lr=1e-3, total_steps=1000, warmup_steps=10,
                        warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05)
  params = jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))['params']
  state = steps.init_state(params, recipe, jax.random.key(2))
  batch_arrays = {
      'image': jax.random.normal(jax.random.key(1),
                                 (batch, image_size, image_size, 3)),
      'label': jnp.arange(batch) % model.num_classes}
  step = jax.jit(functools.partial(steps.train_step, model=model,
                                   recipe=recipe), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch_arrays).compile()
  state, metrics = compiled(state, batch_arrays)
  jax.block_until_ready(metrics['loss'])
  first_step = time.perf_counter() - start
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
            memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {'step': compiled, 'state': state, 'batch': batch_arrays,
          'first_step_s': first_step, 'peak_bytes': peak, 'times': []}


def time_steps(entry: Dict[str, Any], steps_to_time: int) -> float:
  """Seconds per step over `steps_to_time` consecutive steps."""
  start = time.perf_counter()
  for _ in range(steps_to_time):
    entry['state'], metrics = entry['step'](entry['state'], entry['batch'])
  jax.block_until_ready(metrics['loss'])
  return (time.perf_counter() - start) / steps_to_time


def main(argv: Sequence[str]) -> Dict[str, Dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=1,
                      help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=10,
                      help='rounds; each runs every model once, in shuffled order')
  parser.add_argument('--impl', default='auto',
                      help='iRPE lookup impl, or a comma-separated list to '
                      'compare (see irpe_jax.IMPLS)')
  parser.add_argument('--dtype', default='float32',
                      help="compute dtype, e.g. 'bfloat16'")
  parser.add_argument('--depth', type=int, default=12,
                      help='blocks of the models (fewer: a quick smoke run)')
  args = parser.parse_args(argv)
  dtype = None if args.dtype == 'float32' else jnp.dtype(args.dtype)
  print(f'jax {jax.__version__}, {jax.device_count()} '
        f'{jax.default_backend()} device(s): {jax.devices()[0].device_kind}; '
        f'batch {args.batch}, {args.image_size}px, depth {args.depth}, '
        f'{args.dtype}, iRPE impl {args.impl!r}.', flush=True)
  impls = args.impl.split(',')
  entries = {}
  for model_label, name in MODELS:
    for impl in impls if model_label in TARGETS else impls[:1]:
      label = model_label
      if len(impls) > 1 and model_label in TARGETS:
        label = f'{model_label} [{impl}]'
      entries[label] = make_step(name, args.batch, args.image_size, impl,
                                 dtype, args.depth)
      print(f'  compiled {label}: first step '
            f'{entries[label]["first_step_s"]:.1f} s', flush=True)
  # Each round runs the models in a fresh random order: in a fixed order
  # the last model of every round would also be the one that meets the
  # machine after the longest stretch of load.
  order = np.random.default_rng(0)
  for round_index in range(args.rounds):
    for label in order.permutation(list(entries)):
      entry = entries[label]
      entry['times'].append(time_steps(entry, args.steps))
    print(f'  round {round_index + 1}/{args.rounds}: ' + ', '.join(
        f'{label} {entry["times"][-1]:.3f} s/step'
        for label, entry in entries.items()), flush=True)

  base_times = np.array(entries['DeiT-S']['times'])
  base = base_times.min()
  print(f'\n| model | images/s | s/step | vs DeiT-S, best | vs DeiT-S, '
        f'paired median | target | first step (compile) s | '
        f'peak memory MiB |')
  print('|---|---|---|---|---|---|---|---|')
  results = {}
  for label, entry in entries.items():
    times = np.array(entry['times'])
    best = times.min()
    overhead_best = best / base - 1.0
    overhead = float(np.median(times / base_times)) - 1.0
    target = TARGETS.get(label.split(' [')[0])
    verdict = ''
    if target is not None:
      verdict = f'<= {100 * target:.0f}% ' + ('met' if overhead <= target
                                              else 'MISSED')
    peak = entry['peak_bytes']
    peak_text = f'{peak / 2**20:.0f}' if peak is not None else 'n/a'
    print(f'| {label} | {args.batch / best:.2f} | {best:.3f} | '
          f'{100 * overhead_best:+.1f}% | {100 * overhead:+.1f}% | {verdict} '
          f'| {entry["first_step_s"]:.1f} | {peak_text} |')
    results[label] = {'images_per_sec': args.batch / best,
                      'seconds_per_step': float(best), 'overhead': overhead,
                      'overhead_best': float(overhead_best),
                      'first_step_s': entry['first_step_s'],
                      'peak_bytes': peak,
                      'all_times': [float(t) for t in entry['times']]}
  spread = {label: float(np.std(e['times']) / np.mean(e['times']))
            for label, e in entries.items()}
  print('\nRound-to-round spread (std/mean): ' + ', '.join(
      f'{label} {100 * s:.1f}%' for label, s in spread.items()))
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
