r"""DETR's training step with iRPE against plain DETR, and its compiles.

  python -m experiments.benchmarks.bench_detr           # both parts below
  python -m experiments.benchmarks.bench_detr --part step \
      --sizes 256x256,800x1088 [--batch 2] [--rounds 5] \
      [--rpe rpe-2.0-product-ctx-1-k] [--impl auto]
  python -m experiments.benchmarks.bench_detr --part epoch \
      [--coco_annotations /data/coco/annotations/instances_train2017.json]
  python -m experiments.benchmarks.bench_detr --part layer --sizes 800x1088 \
      [--layer_impls factored,onehot,naive]
  python -m experiments.benchmarks.bench_detr --quick   # tiny model, smoke run

Part 'step' compiles and times the training step of the runs
(`experiments.detr.train.compiled_steps`: ResNet-50 DETR of the COCO config,
dropout on, Hungarian matching, set losses on every decoder layer, AdamW,
the state donated and carried from step to step) for plain DETR and with
iRPE, on a batch made as `experiments.detr.data.collate` makes one (each
image padded at the bottom and right, a few COCO-sized boxes per image
padded to `max_objects` targets), passed as an argument so that nothing
folds into constants. Every round runs each model once in a shuffled
order, so that load from other processes hits both alike. It prints the
compile and first-step seconds, the median step, and iRPE's cost two ways:
the ratio of the medians, and the median over rounds of the ratio in the
same round (load that drifts between rounds cancels in it; the target is
judged on this one). Target (the iRPE issue): iRPE-K at most 5% over
plain DETR at the same shapes, on this CPU, at the small size and at a
COCO-like padded size (800x1088 px, 25x34 = 850 encoder tokens).

Part 'layer' (not in 'all') says where iRPE's cost goes: it times one
encoder layer's forward and backward on the token grid of each size,
plain and with iRPE through each lookup impl of `irpe_jax.ops`.

Part 'epoch' counts the compiles of one epoch of multi-scale training: the
loop pads each batch to the smallest `(H, W)` of `pad_sides x pad_sides`
that holds it and jit compiles once per padded shape. It replays the
batches of `experiments.detr.data.train_batches` with the loop's own
functions on image sizes only (`data.epoch_plans`, `data.epoch_order`: the
same shuffles, flips, crops and scales of the same seeds;
`tests/test_detr_bench.py` checks it against the real iterator), so a
whole COCO epoch takes seconds, both as the loop batches (grouped by
orientation) and ungrouped, for comparison. With
`--coco_annotations` the sizes are COCO's own (the `images` of
`instances_train2017.json`); without it they are drawn from
`COCO_SIZE_SHARES`, an approximation written from memory of COCO's size
statistics, not measured: nearly every COCO image is 640 pixels on its
longer side, mostly 4:3 (640x480) or 3:2 (640x427), landscape about two
thirds of the time. It counts the distinct padded shapes (= compiles) for
each `--epoch_batches` size of the batch one host pads (the COCO config's
16 for one host of 8 devices; 2 as the release's batch per GPU), the share
of padded pixels against padding each batch only to its largest image (the
release's `NestedTensor`), and measures the compile of the iRPE step at the
smallest and largest shape met (`--compile_shapes`), which times the count
gives the compile time of the epoch.
"""

import collections
import dataclasses
import functools
import json
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from experiments.benchmarks import bench_detr_memory as bench_memory
from experiments.detr.configs import coco
from experiments.detr import data
from experiments.detr import trainer
from experiments.lib import cli

TARGET = 1.05
RPE = 'rpe-2.0-product-ctx-1-k'
# Approximate shares of COCO 2017 image sizes `(height, width)`: see the
# module docstring; only the resized and padded sides matter here.
COCO_SIZE_SHARES = (
    ((480, 640), 0.32), ((640, 480), 0.11),
    ((427, 640), 0.16), ((640, 427), 0.07),
    ((426, 640), 0.05), ((640, 426), 0.02),
    ((428, 640), 0.03), ((424, 640), 0.02),
    ((425, 640), 0.02), ((612, 612), 0.03),
    ((640, 640), 0.02), ((360, 640), 0.03),
    ((512, 640), 0.02), ((640, 512), 0.01),
    ((500, 375), 0.01), ((375, 500), 0.02),
    ((640, 360), 0.01), ((480, 480), 0.01),
    ((334, 500), 0.01), ((400, 640), 0.02),
)
# `--quick`: a tiny DETR (as the training tests') at small sizes.
QUICK_MODEL = dict(backbone='resnet14', backbone_width=8, hidden_dim=32,
                   num_heads=2, enc_layers=1, dec_layers=1,
                   dim_feedforward=64, num_queries=8)
QUICK_MAX_OBJECTS = 8


def config_of(rpe: str, impl: str, quick: bool) -> Any:
  """The COCO config of `rpe` ('' for plain DETR), or `--quick`'s tiny one."""
  config = coco.get_config(rpe or 'plain')
  config.model.impl = impl
  if quick:
    config.model.update(QUICK_MODEL)
    config.input.max_objects = QUICK_MAX_OBJECTS
  return config


# ----------------------------------------------------------------- step --


def make_batch(rng: np.random.Generator, batch: int, height: int, width: int,
               max_objects: int) -> Dict[str, np.ndarray]:
  """A training batch as `data.collate` pads one, on random images.

  The first image fills `height x width`, the others 70-100% of each side
  (the rest is padding); each has 3-11 boxes (COCO averages 7 per image),
  padded to `max_objects` targets as the loop pads them.
  """
  examples = []
  for b in range(batch):
    h, w = height, width
    if b:
      h, w = (int(height * rng.uniform(0.7, 1)),
              int(width * rng.uniform(0.7, 1)))
    n = min(int(rng.integers(3, 12)), max_objects)
    centres = rng.uniform(0.15, 0.85, (n, 2))
    sizes = rng.uniform(0.05, 0.5, (n, 2))
    examples.append({
        'image': rng.normal(size=(h, w, 3)).astype(np.float32),
        'boxes': np.concatenate([centres, sizes], 1).astype(np.float32),
        'labels': rng.integers(1, 91, n).astype(np.int32),
        'image_id': np.int64(b), 'orig_size': np.array([h, w], np.int32)})
  out = data.collate(examples, (height, width), max_objects)
  return {k: out[k] for k in trainer.BATCH_KEYS}


@dataclasses.dataclass
class Run:
  """One model's compiled step, its carried state and its measurements."""
  step: Any
  state: Any
  batch: Any
  compile_s: float
  first_step_s: float
  temp_bytes: Optional[int]
  times: List[float] = dataclasses.field(default_factory=list)


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:1]), ('data',))


@functools.lru_cache(maxsize=4)
def _initial_state(rpe: str, impl: str, quick: bool):
  """`(model, recipe, state on the host)`, initialised once per model."""
  config = config_of(rpe, impl, quick)
  model = trainer.build_model(config)
  recipe = trainer.recipe_of(config, coco.COCO_TRAIN_IMAGES //
                           config.input.batch_size)
  return model, recipe, jax.device_get(trainer.init_state(model, recipe,
                                                        config))


def _step_and_state(rpe: str, impl: str, quick: bool, mesh: Mesh):
  """The loop's jitted step (`trainer.compiled_steps`) and a fresh state."""
  model, recipe, state = _initial_state(rpe, impl, quick)
  train_step, _ = trainer.compiled_steps(model, recipe, mesh)
  return train_step, jax.device_put(state, NamedSharding(mesh, P()))


def compile_seconds(rpe: str, impl: str, quick: bool, batch: int,
                    height: int, width: int) -> float:
  """Seconds to lower and compile the training step at a padded shape."""
  train_step, state = _step_and_state(rpe, impl, quick, _mesh())
  shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      make_batch(np.random.default_rng(0), batch, height, width,
                 config_of(rpe, impl, quick).input.max_objects))
  start = time.perf_counter()
  train_step.lower(state, shapes).compile()
  return time.perf_counter() - start


def make_run(rpe: str, impl: str, quick: bool,
             batch_arrays: Dict[str, np.ndarray]) -> Run:
  """Compiles the loop's step for the model and runs its first step."""
  mesh = _mesh()
  train_step, state = _step_and_state(rpe, impl, quick, mesh)
  batch_arrays = jax.device_put(batch_arrays, NamedSharding(mesh, P('data')))
  start = time.perf_counter()
  compiled = train_step.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  run = Run(compiled, state, batch_arrays, compile_s, 0.0,
            None if memory is None else memory.temp_size_in_bytes)
  run.first_step_s = time_step(run)
  return run


def time_step(run: Run) -> float:
  """Seconds of one step, the state carried (it is donated)."""
  start = time.perf_counter()
  run.state, metrics = run.step(run.state, run.batch)
  jax.block_until_ready((run.state, metrics))
  return time.perf_counter() - start


def bench_steps(sizes: Sequence[Tuple[int, int]], batch: int, rounds: int,
                rpe: str, impl: str, quick: bool = False
                ) -> Dict[Tuple[int, int], Dict[str, Run]]:
  """`{(h, w): {'plain': Run, rpe: Run}}`, rounds interleaved per size."""
  results = {}
  order = np.random.default_rng(0)
  for height, width in sizes:
    config = config_of('', impl, quick)
    batch_arrays = make_batch(np.random.default_rng(1), batch, height, width,
                              config.input.max_objects)
    runs = {}
    for name in ('plain', rpe):
      runs[name] = make_run('' if name == 'plain' else rpe, impl, quick,
                            batch_arrays)
      print(f'  {height}x{width} {name}: compile '
            f'{runs[name].compile_s:.1f} s, first step '
            f'{runs[name].first_step_s:.2f} s, XLA temp memory '
            f'{_mib(runs[name].temp_bytes)} MiB', flush=True)
    for r in range(rounds):
      for name in order.permutation(list(runs)):
        runs[name].times.append(time_step(runs[name]))
      print(f'  round {r + 1}/{rounds}: ' + ', '.join(
          f'{n} {run.times[-1]:.3f} s' for n, run in runs.items()),
            flush=True)
    results[(height, width)] = runs
  return results


def _mib(n: Optional[int]) -> str:
  return 'n/a' if n is None else f'{n / 2**20:.0f}'


def report_steps(results: Dict[Tuple[int, int], Dict[str, Run]], batch: int,
                 rpe: str) -> Dict[str, Any]:
  """Prints the step table; returns the overheads per size."""
  print(f'\n| padded size | tokens | model | compile s | first step s | '
        f'median step s | min step s | vs plain, medians | '
        f'vs plain, paired median | target <= {TARGET} | XLA temp MiB |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  summary = {}
  for (h, w), runs in results.items():
    tokens = -(-h // 32) * -(-w // 32)
    plain = np.array(runs['plain'].times)
    for name, run in runs.items():
      times = np.array(run.times)
      ratio = float(np.median(times) / np.median(plain))
      paired = float(np.median(times / plain))
      verdict = ''
      if name != 'plain':
        verdict = 'met' if paired <= TARGET else 'MISSED'
        summary[f'{h}x{w}'] = {'ratio_of_medians': ratio,
                               'paired_ratio': paired, 'met': paired <= TARGET}
      print(f'| {h}x{w} | {tokens} | {name} | {run.compile_s:.1f} | '
            f'{run.first_step_s:.2f} | {np.median(times):.3f} | '
            f'{times.min():.3f} | {ratio:.3f} | {paired:.3f} | {verdict} | '
            f'{_mib(run.temp_bytes)} |')
    spread = ', '.join(f'{n} {100 * np.std(r.times) / np.mean(r.times):.1f}%'
                       for n, r in runs.items())
    print(f'|  |  | round-to-round spread (std/mean): {spread} '
          '| | | | | | | | |')
  print(f'batch {batch} per step; iRPE = {rpe!r}.')
  return summary


# ---------------------------------------------------------------- layer --


def bench_layers(sizes: Sequence[Tuple[int, int]], batch: int, rounds: int,
                 rpe: str, impls: Sequence[str], quick: bool = False
                 ) -> Dict[Tuple[int, int], Dict[str, float]]:
  """Median seconds of one encoder layer's forward+backward per variant.

  Where the step's iRPE cost goes: `bench_memory.encoder_layer_grad` (one
  layer of the release's encoder, gradients of parameters and input
  against a random cotangent passed as an argument) on the `layer4` token
  grid of each padded size, plain and with `rpe` through each impl.
  """
  dims = dict(heads=2, dim=32, dim_feedforward=64) if quick else {}
  results = {}
  order = np.random.default_rng(0)
  for height, width in sizes:
    grid = (-(-height // 32), -(-width // 32))
    entries = {}
    for label, spec, impl in [('plain', '', 'auto')] + [
        (f'{rpe} [{impl}]', rpe, impl) for impl in impls]:
      fn, shapes = bench_memory.encoder_layer_grad(spec, impl, batch, *grid,
                                                   **dims)
      keys = iter(jax.random.split(jax.random.key(3), 64))
      args = jax.tree.map(
          lambda x: (jnp.zeros(x.shape, x.dtype) if x.dtype == jnp.bool_ else
                     0.05 * jax.random.normal(next(keys), x.shape, x.dtype)),
          shapes)
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(*args).compile()
      compile_s = time.perf_counter() - start
      jax.block_until_ready(compiled(*args))
      entries[label] = (compiled, args, compile_s, [])
    for _ in range(rounds):
      for label in order.permutation(list(entries)):
        compiled, args, _, times = entries[label]
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    plain = np.array(entries['plain'][3])
    print(f'\nOne encoder layer, forward + backward, batch {batch}, '
          f'{grid[0]}x{grid[1]} = {grid[0] * grid[1]} tokens ({height}x'
          f'{width} px), {rounds} rounds:')
    print('| variant | compile s | median ms | vs plain, paired median | '
          'extra ms |')
    print('|---|---|---|---|---|')
    results[(height, width)] = {}
    for label, (_, _, compile_s, times) in entries.items():
      times = np.array(times)
      extra = 1e3 * (np.median(times) - np.median(plain))
      print(f'| {label} | {compile_s:.1f} | {1e3 * np.median(times):.1f} | '
            f'{np.median(times / plain):.3f} | {extra:+.1f} |')
      results[(height, width)][label] = float(np.median(times))
  return results


# ---------------------------------------------------------------- epoch --


def coco_sizes(num_images: int, seed: int = 0,
               annotations: Optional[str] = None) -> np.ndarray:
  """`(N, 2)` image `(height, width)`: COCO's own, or drawn as COCO's.

  Args:
    num_images: images to draw from `COCO_SIZE_SHARES` (ignored with
      `annotations`).
    seed: of the draw.
    annotations: a COCO `instances_*.json`; its images' sizes, in order.
  """
  if annotations:
    with open(annotations) as f:
      images = json.load(f)['images']
    return np.array([(im['height'], im['width']) for im in images], np.int64)
  sizes = np.array([s for s, _ in COCO_SIZE_SHARES], np.int64)
  shares = np.array([p for _, p in COCO_SIZE_SHARES])
  draw = np.random.default_rng(seed).choice(len(sizes), num_images,
                                            p=shares / shares.sum())
  return sizes[draw]


def epoch_batches(sizes: np.ndarray, batch_size: int, seed: int, epoch: int,
                  scales: Sequence[int], max_size: int, flip: bool,
                  pad_sides: Sequence[int],
                  random_crop: Optional[data.RandomCrop] = None,
                  grouped: bool = False
                  ) -> Iterator[Tuple[Tuple[int, int], List[Tuple[int, int]]]]:
  """The batches of epoch `epoch` of `data.train_batches`, as sizes.

  The loop's own functions on sizes alone: each image's transform
  (`data.epoch_plans`) and the batches (`data.epoch_order`, by orientation
  with `grouped`, as the loop batches when it knows the sizes).

  Yields:
    `((H, W), [(h, w) of each image])`: the padded shape of each batch
    and the sizes of its augmented images, in the loop's order.
  """
  plans = data.epoch_plans(sizes, seed, epoch, scales, max_size, flip,
                           random_crop)
  for order in data.epoch_order(len(sizes), batch_size, seed, epoch,
                                data.portrait(plans) if grouped else None):
    images = [plans[i].out for i in order]
    shape = (data.padded_side(max(h for h, _ in images), pad_sides),
             data.padded_side(max(w for _, w in images), pad_sides))
    yield shape, images


def count_shapes(sizes: np.ndarray, batch_size: int, config: Any,
                 pad_sides: Sequence[int], grouped: bool = False
                 ) -> Dict[str, Any]:
  """Padded shapes of epoch 0 of `config`'s input, and their padding."""
  shapes = collections.Counter()
  pixels = padded = nested = 0
  for (height, width), images in epoch_batches(
      sizes, batch_size, config.seed, 0, config.input.scales,
      config.input.max_size, config.input.flip, pad_sides,
      data.crop_of(config.input), grouped):
    shapes[(height, width)] += 1
    real = sum(h * w for h, w in images)
    pixels += real
    padded += len(images) * height * width
    nested += len(images) * (max(h for h, _ in images) *
                             max(w for _, w in images))
  return {'shapes': shapes, 'batches': sum(shapes.values()),
          'padding': 1 - pixels / padded, 'nested_padding': 1 - pixels / nested}


def bench_epoch(sizes: np.ndarray, batch_sizes: Sequence[int], rpe: str,
                impl: str, compile_shapes: str, compile_batch: int,
                pad_sides: Optional[Sequence[int]], quick: bool = False
                ) -> Dict[str, Any]:
  """Prints compiles and padding of one epoch per batch size; returns them."""
  config = config_of(rpe, impl, quick)
  pad_sides = tuple(pad_sides or config.input.pad_sides)
  print(f'\n{len(sizes)} images, scales {tuple(config.input.scales)}, '
        f'max_size {config.input.max_size}, flip {config.input.flip}, '
        f'crop {data.crop_of(config.input)}, '
        f'pad_sides {pad_sides} (at most {len(pad_sides) ** 2} shapes), '
        f'seed {config.seed}, epoch 0.')
  print('\n| images per padded batch | grouped by orientation | batches | '
        'compiles (padded shapes) | padded pixels | padded pixels, each '
        'batch to its largest image |')
  print('|---|---|---|---|---|---|')
  counts, ungrouped, met = {}, {}, set()
  for batch_size in batch_sizes:
    for grouped in (False, True):
      c = count_shapes(sizes, batch_size, config, pad_sides, grouped)
      (counts if grouped else ungrouped)[batch_size] = c
      met |= set(c['shapes'])
      print(f'| {batch_size} | {"yes" if grouped else "no"} | '
            f'{c["batches"]} | {len(c["shapes"])} | '
            f'{100 * c["padding"]:.1f}% | '
            f'{100 * c["nested_padding"]:.1f}% |')
  for batch_size, c in counts.items():
    common = ', '.join(f'{h}x{w} {100 * n / c["batches"]:.1f}%'
                       for (h, w), n in c['shapes'].most_common())
    print(f'batch {batch_size}, shares of the padded shapes: {common}')
  by_pixels = sorted(met, key=lambda s: (s[0] * s[1], s))
  chosen = {'ends': [by_pixels[0], by_pixels[-1]] if by_pixels else [],
            'all': by_pixels, 'none': []}[compile_shapes]
  chosen = list(dict.fromkeys(chosen))
  seconds = {}
  for height, width in chosen:
    seconds[(height, width)] = compile_seconds(rpe, impl, quick,
                                               compile_batch, height, width)
    print(f'  compile of the {rpe} step at {compile_batch}x{height}x{width}: '
          f'{seconds[(height, width)]:.1f} s', flush=True)
  if seconds:
    low, high = min(seconds.values()), max(seconds.values())
    mean = float(np.mean(list(seconds.values())))
    print(f'\nCompile of the {rpe} step (lower + compile, batch '
          f'{compile_batch}): ' + ', '.join(
              f'{h}x{w} {s:.1f} s' for (h, w), s in seconds.items()))
    for batch_size, c in counts.items():
      n = len(c['shapes'])
      print(f'batch {batch_size}: {n} compiles x {low:.1f}-{high:.1f} s = '
            f'{n * low:.0f}-{n * high:.0f} s of compiling in the epoch '
            f'(about {n * mean:.0f} s).')
  return {'counts': counts, 'ungrouped': ungrouped, 'compile_s': seconds}


# ----------------------------------------------------------------- main --


COMMAND = cli.Command('python -m experiments.benchmarks.bench_detr', __doc__)
flags.DEFINE_enum(
    'part', 'all', ('all', 'step', 'layer', 'epoch'),
    "'all' is step and epoch; 'layer' times one "
    'encoder layer per impl', flag_values=COMMAND.flags)
flags.DEFINE_string(
    'sizes', None,
    'padded HxW sizes of the step part, comma-'
    'separated (default 256x256,800x1088; --quick 64x64,'
    '64x96)', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'batch', 2,
    'images per timed step (the release trains 2 per '
    'GPU)', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'rounds', None,
    'timed rounds, each model once per round '
    '(default 5; --quick 2)', flag_values=COMMAND.flags)
flags.DEFINE_string(
    'rpe', RPE, "the release's enc_rpe2d", flag_values=COMMAND.flags)
flags.DEFINE_string(
    'impl', 'auto', 'iRPE lookup impl (see irpe_jax.ops)',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'layer_impls', 'factored,onehot,naive',
    "impls of --part layer's iRPE layers", flag_values=COMMAND.flags)
flags.DEFINE_string(
    'epoch_batches', '2,16', 'images per padded batch to count compiles for',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'coco_annotations', None,
    "COCO's instances_train2017.json, for its real "
    'image sizes (default: COCO_SIZE_SHARES)', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'num_images', None,
    'images drawn without --coco_annotations (default '
    f'{coco.COCO_TRAIN_IMAGES}; --quick 256)', flag_values=COMMAND.flags)
flags.DEFINE_string(
    'pad_sides', None, "comma-separated sides instead of the config's",
    flag_values=COMMAND.flags)
flags.DEFINE_enum(
    'compile_shapes', None, ('ends', 'all', 'none'),
    'padded shapes to time the compile at: smallest '
    'and largest met, all, or none (default ends; --quick '
    'none)', flag_values=COMMAND.flags)
flags.DEFINE_bool(
    'quick', False, 'a tiny DETR at tiny sizes: a smoke run, seconds',
    flag_values=COMMAND.flags)


def parse_args(argv: Optional[Sequence[str]]) -> Any:
  args = COMMAND.namespace(argv)
  args.sizes = [tuple(int(v) for v in s.split('x')) for s in (
      args.sizes or ('64x64,64x96' if args.quick else '256x256,800x1088')
  ).split(',')]
  if args.rounds is None:
    args.rounds = 2 if args.quick else 5
  if args.num_images is None:
    args.num_images = 256 if args.quick else coco.COCO_TRAIN_IMAGES
  if args.compile_shapes is None:
    args.compile_shapes = 'none' if args.quick else 'ends'
  args.epoch_batches = [int(b) for b in args.epoch_batches.split(',')]
  if args.pad_sides:
    args.pad_sides = [int(s) for s in args.pad_sides.split(',')]
  return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  print(f'jax {jax.__version__}, {jax.default_backend()}: '
        f'{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load '
        f'average {os.getloadavg()[0]:.2f}; '
        f'{"tiny DETR (--quick)" if args.quick else "ResNet-50 DETR"} '
        f'of the COCO config, iRPE {args.rpe!r}, impl {args.impl!r}.',
        flush=True)
  out = {}
  if args.part in ('all', 'step'):
    results = bench_steps(args.sizes, args.batch, args.rounds, args.rpe,
                          args.impl, args.quick)
    out['step'] = report_steps(results, args.batch, args.rpe)
  if args.part == 'layer':
    out['layer'] = bench_layers(args.sizes, args.batch, args.rounds,
                                args.rpe, args.layer_impls.split(','),
                                args.quick)
  if args.part in ('all', 'epoch'):
    sizes = coco_sizes(args.num_images, annotations=args.coco_annotations)
    out['epoch'] = bench_epoch(sizes, args.epoch_batches, args.rpe,
                               args.impl, args.compile_shapes, args.batch,
                               args.pad_sides, args.quick)
  print(f'load average at the end {os.getloadavg()[0]:.2f}.')
  return out


if __name__ == '__main__':
  main()
