r"""Training-step throughput of DeiT-S: plain, iRPE-K and iRPE-QKV.

  python -m experiments.benchmarks.bench_train [--batch 16] [--steps 1]
      [--rounds 10] [--impl auto[,onehot,...]] [--depth 12] [--dtype bfloat16]
      [--models plain,k,qkv] [--json PATH]

One full training step of each model at 224px on random data, in one
process: `experiments.deit.steps.train_step`, the step of the training runs
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

On an accelerator, the device's own peak memory
(`memory_stats()['peak_bytes_in_use']`) is reported too; it is the peak of
the whole process, so run one model per process (`--models k`) to read it
per model, as `scripts/accelerator_check.sh` does.
"""

import functools
import json
import sys
import time
from typing import Any, Dict, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.deit import steps
from experiments.lib import cli
from irpe_jax import models

MODELS = (
    ('DeiT-S', 'deit_small_patch16_224'),
    ('DeiT-S + iRPE-K', 'deit_small_patch16_224_ctx_product_50_shared_k'),
    ('DeiT-S + iRPE-QKV', 'deit_small_patch16_224_ctx_product_50_shared_qkv'),
)
# `--models` keys of the MODELS labels.
MODEL_KEYS = {'plain': 'DeiT-S', 'k': 'DeiT-S + iRPE-K',
              'qkv': 'DeiT-S + iRPE-QKV'}
BASE = 'DeiT-S'
TARGETS = {'DeiT-S + iRPE-K': 0.03, 'DeiT-S + iRPE-QKV': 0.10}


def device_peak_bytes() -> Optional[int]:
  """The default device's peak memory in use so far (None where unknown)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else int(peak)


def make_step(name: str, batch: int, image_size: int, impl: str,
              dtype: Any, depth: int = 12) -> Dict[str, Any]:
  """Compiles `experiments.deit.steps.train_step` for model `name`.

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


COMMAND = cli.Command('python -m experiments.benchmarks.bench_train', __doc__)
flags.DEFINE_integer('batch', 16, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('image_size', 224, '', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'steps', 1, 'timed steps per round', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'rounds', 10, 'rounds; each runs every model once, in shuffled order',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'impl', 'auto',
    'iRPE lookup impl, or a comma-separated list to '
    'compare (see irpe_jax.IMPLS)', flag_values=COMMAND.flags)
flags.DEFINE_enum(
    'dtype', 'float32', ('float32', 'bfloat16'),
    'compute dtype (parameters stay float32)', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'depth', 12, 'blocks of the models (fewer: a quick smoke run)',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'models', ','.join(MODEL_KEYS),
    'comma-separated models to run, of '
    f'{sorted(MODEL_KEYS)}; the overheads need plain',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'json', None, 'also write the results as JSON to PATH',
    flag_values=COMMAND.flags)


def parse_args(argv: Sequence[str]) -> Any:
  args = COMMAND.namespace(argv)
  keys = [k for k in args.models.split(',') if k]
  unknown = sorted(set(keys) - set(MODEL_KEYS))
  if unknown or not keys:
    cli.usage_error(f'--models: unknown {unknown}; expected some of '
                 f'{sorted(MODEL_KEYS)}.')
  args.labels = [MODEL_KEYS[k] for k in MODEL_KEYS if k in keys]
  return args


def main(argv: Sequence[str]) -> Dict[str, Dict[str, Any]]:
  args = parse_args(argv)
  dtype = None if args.dtype == 'float32' else jnp.dtype(args.dtype)
  print(f'jax {jax.__version__}, {jax.device_count()} '
        f'{jax.default_backend()} device(s): {jax.devices()[0].device_kind}; '
        f'batch {args.batch}, {args.image_size}px, depth {args.depth}, '
        f'{args.dtype}, iRPE impl {args.impl!r}.', flush=True)
  impls = args.impl.split(',')
  entries = {}
  for model_label, name in MODELS:
    if model_label not in args.labels:
      continue
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
  device_peak = device_peak_bytes()
  results = _report(entries, args, device_peak)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'backend': jax.default_backend(),
                 'device_kind': jax.devices()[0].device_kind,
                 'jax': jax.__version__, 'batch': args.batch,
                 'image_size': args.image_size, 'depth': args.depth,
                 'dtype': args.dtype, 'impl': args.impl,
                 'device_peak_bytes': device_peak, 'models': results},
                f, indent=1)
  return results


def _report(entries: Dict[str, Dict[str, Any]], args: Any,
            device_peak: Optional[int]) -> Dict[str, Dict[str, Any]]:
  """Prints the table; returns the results per model label."""
  base_times = (np.array(entries[BASE]['times']) if BASE in entries
                else None)
  mib = lambda b: f'{b / 2**20:.0f}' if b is not None else 'n/a'
  print('\n| model | images/s | s/step | vs DeiT-S, best | vs DeiT-S, '
        'paired median | target | first step (compile) s | '
        'XLA peak memory MiB |')
  print('|---|---|---|---|---|---|---|---|')
  results = {}
  for label, entry in entries.items():
    times = np.array(entry['times'])
    best = times.min()
    overhead = overhead_best = None
    verdict = ''
    if base_times is not None:
      overhead_best = float(best / base_times.min() - 1.0)
      overhead = float(np.median(times / base_times)) - 1.0
      target = TARGETS.get(label.split(' [')[0])
      if target is not None:
        verdict = f'<= {100 * target:.0f}% ' + (
            'met' if overhead <= target else 'MISSED')
    pct = lambda o: 'n/a' if o is None else f'{100 * o:+.1f}%'
    print(f'| {label} | {args.batch / best:.2f} | {best:.3f} | '
          f'{pct(overhead_best)} | {pct(overhead)} | {verdict} '
          f'| {entry["first_step_s"]:.1f} | {mib(entry["peak_bytes"])} |')
    results[label] = {'images_per_sec': args.batch / best,
                      'seconds_per_step': float(best), 'overhead': overhead,
                      'overhead_best': overhead_best,
                      'first_step_s': entry['first_step_s'],
                      'peak_bytes': entry['peak_bytes'],
                      'all_times': [float(t) for t in entry['times']]}
  spread = {label: float(np.std(e['times']) / np.mean(e['times']))
            for label, e in entries.items()}
  print('\nRound-to-round spread (std/mean): ' + ', '.join(
      f'{label} {100 * s:.1f}%' for label, s in spread.items()))
  if device_peak is not None:
    print(f'Device peak memory of this process: {mib(device_peak)} MiB.')
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
