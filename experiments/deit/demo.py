r"""Offline demo: what iRPE does for a small ViT on handwritten digits.

Trains small vision transformers on scikit-learn's 8x8 handwritten digits
(1797 images that ship inside scikit-learn: nothing is downloaded), cut into
a 4x4 grid of 2x2-pixel patches, so that a model without any position
encoding sees only a bag of 16 patches. Four variants, four seeds each:

  none      no position encoding at all;
  abs       learnable absolute position embedding (plain ViT / DeiT);
  irpe_k    absolute + contextual product iRPE on keys (the paper's iRPE-K);
  irpe_qkv  absolute + contextual product iRPE on queries, keys and values.

The seeds of one variant train together under `jax.vmap` of the
experiments' training and eval steps (`experiments.deit.steps`), so each variant
compiles one of each. Prints a table of test accuracy
(mean, spread over seeds) and writes into `--out`:

  results.json          settings, per-seed accuracies, curves and timings;
  learning_curves.png   train loss and test accuracy per epoch;
  accuracy.png          final test accuracy per variant, each seed a dot;
  attention_maps.png    attention of one query at the first and last block
                        of a trained model of each variant, one colour scale
                        (`irpe_jax.viz`; the 4x4 grid is too small to show
                        the locality of the paper's Figure 5, which
                        `experiments.deit.figure5` shows on an 8x8 grid);
  bucket_maps.png       bucket ids of the four iRPE methods (cross as its row
                        and column tables, each method at its own ratio) for
                        the centre query of a 15x15 grid.

`--quick` is a smoke run (tiny models, two epochs, a subset): it checks that
everything runs, and its accuracies mean nothing.

Usage:
  python -m experiments.deit.demo [--out DIR] [--seeds N] [--epochs N] [--quick]
"""

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Dict, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.deit import plots
from experiments.deit import steps
from experiments.lib import cli
import irpe_jax
from irpe_jax import models
from irpe_jax import viz

# name -> (uses the absolute position embedding, iRPE targets or None).
VARIANTS = {
    'none': (False, None),
    'abs': (True, None),
    'irpe_k': (True, 'k'),
    'irpe_qkv': (True, 'qkv'),
}
DESCRIPTIONS = {
    'none': 'no position encoding',
    'abs': 'absolute only',
    'irpe_k': 'abs + iRPE-K (ctx product)',
    'irpe_qkv': 'abs + iRPE-QKV (ctx product)',
}
# The paper's default ratio: product method gives 7 x 7 + 1 = 50 buckets.
RPE_RATIO = 1.9


@dataclasses.dataclass(frozen=True)
class Settings:
  """Model and training hyper-parameters of the demo."""
  patch_size: int = 2
  embed_dim: int = 48
  depth: int = 3
  num_heads: int = 3
  mlp_ratio: float = 2.0
  drop_path_rate: float = 0.0
  epochs: int = 20
  batch_size: int = 128
  base_lr: float = 3e-3  # peak learning rate at batch_size.
  warmup_lr: float = 1e-6
  min_lr: float = 1e-5
  weight_decay: float = 0.05
  warmup_epochs: int = 2
  label_smoothing: float = 0.1
  max_shift: int = 0  # random translation by up to this many pixels.
  num_seeds: int = 4
  train_subset: int = 0  # > 0: use only this many training images.
  upscale: int = 1  # digits upscaled (nearest) to 8 * upscale pixels.
  smoke: bool = False  # a run that checks the code; accuracies mean nothing.


QUICK = Settings(embed_dim=16, depth=2, num_heads=2, mlp_ratio=1.0,
                 epochs=2, batch_size=32, warmup_epochs=1, num_seeds=2,
                 train_subset=256, smoke=True)
SMOKE_NOTE = ('SMOKE RUN (--quick): tiny models trained for seconds; it checks '
              'that everything runs, and its accuracies mean nothing.')


def load_digits(test_fraction: float = 0.25, split_seed: int = 0,
                upscale: int = 1
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's digits as normalised `(N, 8 s, 8 s, 1)` float32 NHWC.

  Args:
    test_fraction: held-out share, stratified by class.
    split_seed: seed of the (fixed) train/test split.
    upscale: `s`, each pixel repeated `s x s` times.

  Returns:
    `(train_images, train_labels, test_images, test_labels)`.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] / 16.0
  images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, labels, test_size=test_fraction, stratify=labels,
      random_state=split_seed)
  mean, std = x_train.mean(), x_train.std()
  return ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


def make_model(variant: str, settings: Settings,
               num_classes: int = 10) -> Any:
  """The ViT of one variant on `8 upscale` px single-channel digits."""
  use_abs, rpe_on = VARIANTS[variant]
  rpe_config = None
  if rpe_on is not None:
    rpe_config = irpe_jax.get_rpe_config(
        ratio=RPE_RATIO, method='product', mode='ctx', shared_head=True,
        skip=1, rpe_on=rpe_on)
  return models.VisionTransformer(
      img_size=8 * settings.upscale, patch_size=settings.patch_size,
      in_chans=1,
      num_classes=num_classes,
      embed_dim=settings.embed_dim, depth=settings.depth,
      num_heads=settings.num_heads, mlp_ratio=settings.mlp_ratio,
      drop_path_rate=settings.drop_path_rate, rpe_config=rpe_config,
      use_abs_pos_embed=use_abs)


def shift_batch(images: np.ndarray, max_shift: int,
                rng: np.random.Generator) -> np.ndarray:
  """Translates each `(..., H, W, C)` image by up to `max_shift` pixels."""
  if max_shift <= 0:
    return images
  *lead, h, w, c = images.shape
  flat = images.reshape(-1, h, w, c)
  pad = max_shift
  padded = np.pad(flat, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, size=len(flat))
  dx = rng.integers(0, 2 * pad + 1, size=len(flat))
  rows = dy[:, None] + np.arange(h)[None]
  cols = dx[:, None] + np.arange(w)[None]
  out = padded[np.arange(len(flat))[:, None, None], rows[:, :, None],
               cols[:, None, :]]
  return out.reshape(*lead, h, w, c)


def recipe_of(settings: Settings, steps_per_epoch: int) -> steps.Recipe:
  """The training step's hyper-parameters: no mixup, no lr scaling."""
  return steps.Recipe(
      peak_lr=settings.base_lr, total_steps=steps_per_epoch * settings.epochs,
      warmup_steps=settings.warmup_epochs * steps_per_epoch,
      warmup_lr=settings.warmup_lr, min_lr=settings.min_lr,
      weight_decay=settings.weight_decay,
      label_smoothing=settings.label_smoothing)


def train_variant(variant: str, settings: Settings, data: Sequence[np.ndarray],
                  seeds: Sequence[int]) -> Dict[str, Any]:
  """Trains one variant for every seed at once (vmapped over seeds).

  Args:
    variant: a key of `VARIANTS`.
    settings: hyper-parameters.
    data: `(train_images, train_labels, test_images, test_labels)`.
    seeds: one model per seed; seeds set the init, data order, augmentation
      and stochastic depth.

  Returns:
    A dict of per-epoch curves `(num_seeds, epochs)`, final accuracies,
    timings, and the trained `params` (leading seed axis).
  """
  x_train, y_train, x_test, y_test = data
  num_seeds, batch = len(seeds), settings.batch_size
  steps_per_epoch = len(x_train) // batch
  model = make_model(variant, settings)
  recipe = recipe_of(settings, steps_per_epoch)
  # The experiments' one training step, each seed its own model and data.
  train_step = jax.jit(jax.vmap(functools.partial(
      steps.train_step, model=model, recipe=recipe)), donate_argnums=0)
  eval_step = jax.jit(jax.vmap(functools.partial(steps.eval_step, model=model),
                               in_axes=(0, None)))
  test_batch = {'image': x_test, 'label': y_test,
                'mask': np.ones(len(y_test), np.float32)}

  start = time.time()
  # Eager init, one seed at a time: its small ops compile once for all
  # variants, where a jitted init would compile for seconds per variant.
  init_keys, step_keys = zip(*(jax.random.split(jax.random.key(s))
                               for s in seeds))
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *(
      steps.init_state(
          model.init(k, jnp.zeros((1, *x_train.shape[1:])),
                     train=False)['params'],
          recipe, step_key)
      for k, step_key in zip(init_keys, step_keys)))
  orders = [np.random.default_rng([s, 1]) for s in seeds]
  shifts = np.random.default_rng([*seeds, 2])

  curves = {'train_loss': np.zeros((num_seeds, settings.epochs)),
            'test_accuracy': np.zeros((num_seeds, settings.epochs))}
  compile_s, step = 0.0, 0
  for epoch in range(settings.epochs):
    perms = np.stack([rng.permutation(len(x_train)) for rng in orders])
    losses = []
    for i in range(steps_per_epoch):
      idx = perms[:, i * batch:(i + 1) * batch]
      images = shift_batch(x_train[idx], settings.max_shift, shifts)
      t0 = time.time()
      state, metrics = train_step(state, {'image': images,
                                          'label': y_train[idx]})
      losses.append(metrics['loss'])
      if step == 0:
        jax.block_until_ready(metrics['loss'])
        compile_s += time.time() - t0
      step += 1
    curves['train_loss'][:, epoch] = np.mean(jax.device_get(losses), axis=0)
    t0 = time.time()
    sums = jax.device_get(eval_step(state['params'], test_batch))
    curves['test_accuracy'][:, epoch] = sums['top1'] / sums['count']
    if epoch == 0:
      compile_s += time.time() - t0
    acc = curves['test_accuracy'][:, epoch]
    if epoch and (epoch + 1) % 5 and epoch + 1 < settings.epochs:
      continue  # progress every 5 epochs.
    print(f'  {variant:9s} epoch {epoch + 1:3d}/{settings.epochs}  '
          f'loss {curves["train_loss"][:, epoch].mean():.3f}  '
          f'test acc {acc.mean():.3f} (+-{acc.std():.3f})  '
          f'[{time.time() - start:5.1f}s]', flush=True)
  final = curves['test_accuracy'][:, -1]
  return {
      'description': DESCRIPTIONS[variant],
      'seeds': list(seeds),
      'test_accuracy': final.tolist(),
      'mean': float(final.mean()),
      'std': float(final.std(ddof=1)) if num_seeds > 1 else 0.0,
      'min': float(final.min()),
      'max': float(final.max()),
      'curves': {k: v.tolist() for k, v in curves.items()},
      'compile_seconds': compile_s,
      'seconds': time.time() - start,
      'num_params': int(sum(np.prod(x.shape[1:]) for x in
                            jax.tree.leaves(state['params']))),
      'params': state['params'],
  }


def attention_of(variant: str, settings: Settings, params: Any,
                 images: np.ndarray) -> np.ndarray:
  """Head-averaged attention weights `(depth, B, L, L)` of `images`."""
  model = make_model(variant, settings)
  return viz.attention_weights(model, {'params': params}, images,
                               train=False).mean(2)


def format_table(results: Dict[str, Any]) -> str:
  """The printed table of test accuracy, best variant first."""
  seeds = len(next(iter(results.values()))['test_accuracy'])
  lines = [f'{"variant":10s} {"position encoding":30s} {"params":>7s} '
           f'{"test acc (mean +- std, n=" + str(seeds) + ")":>30s} '
           f'{"min":>6s} {"max":>6s} {"time":>6s}']
  for name, res in sorted(results.items(), key=lambda kv: -kv[1]['mean']):
    lines.append(
        f'{name:10s} {res["description"]:30s} {res["num_params"]:7d} '
        f'{100 * res["mean"]:23.2f} +- {100 * res["std"]:4.2f} '
        f'{100 * res["min"]:6.2f} {100 * res["max"]:6.2f} '
        f'{res["seconds"]:5.0f}s')
  return '\n'.join(lines)


def summarise_ordering(results: Dict[str, Any]) -> str:
  """States the ordering of the means, and which gaps exceed the spread."""
  ranked = sorted(results.items(), key=lambda kv: -kv[1]['mean'])
  parts = []
  for (a, ra), (b, rb) in zip(ranked, ranked[1:]):
    gap = ra['mean'] - rb['mean']
    spread = max(ra['std'], rb['std'])
    sign = '>' if gap > spread else '~'
    parts.append(f'{a} {sign} {b} (gap {100 * gap:.2f} points, '
                 f'spread {100 * spread:.2f})')
  return ('Ordering by mean test accuracy ("~": gap within one std over '
          'seeds, not a clear difference):\n  ' + '\n  '.join(parts))


COMMAND = cli.Command('python -m experiments.deit.demo', __doc__)
flags.DEFINE_string(
    'out', 'irpe_demo', 'where plots and results.json go',
    flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'seeds', None, 'seeds per variant (default 4; 2 with --quick)',
    flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'epochs', None, 'training epochs (default 20; 2 with --quick)',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'variants', ','.join(VARIANTS),
    'comma-separated subset of ' + ','.join(VARIANTS),
    flag_values=COMMAND.flags)
flags.DEFINE_bool(
    'quick', False,
    'smoke run: tiny models and data, for tests '
    '(~1 min); its accuracies mean nothing', flag_values=COMMAND.flags)


def parse_args(argv: Sequence[str]) -> Any:
  return COMMAND.namespace(argv)


def main(argv: Sequence[str]) -> Dict[str, Any]:
  args = parse_args(argv)
  settings = QUICK if args.quick else Settings()
  if args.seeds is not None:
    settings = dataclasses.replace(settings, num_seeds=args.seeds)
  if args.epochs is not None:
    settings = dataclasses.replace(settings, epochs=args.epochs)
  variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f'unknown variants {unknown}; choose from '
                     f'{list(VARIANTS)}')
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  data = load_digits()
  if settings.train_subset:
    data = (data[0][:settings.train_subset], data[1][:settings.train_subset],
            *data[2:])
  seeds = list(range(settings.num_seeds))
  grid = 8 // settings.patch_size
  if settings.smoke:
    print(SMOKE_NOTE)
  print(f'Digits: {len(data[0])} train / {len(data[2])} test images of 8x8 '
        f'as {grid}x{grid} patches; {len(seeds)} seeds x {settings.epochs} '
        f'epochs per variant on {jax.device_count()} '
        f'{jax.default_backend()} device(s).', flush=True)

  results = {}
  for i, variant in enumerate(variants):
    left = ''
    if i:
      per_variant = (time.time() - start) / i
      left = f', about {per_variant * (len(variants) - i):.0f}s left'
    print(f'[{i + 1}/{len(variants)}] {variant}: {DESCRIPTIONS[variant]}'
          f'{left}', flush=True)
    results[variant] = train_variant(variant, settings, data, seeds)

  query = (1, 2)
  image = data[2][0]
  maps = {}
  for variant in variants:
    params = jax.tree.map(lambda x: x[0], results[variant].pop('params'))
    maps[DESCRIPTIONS[variant]] = attention_of(variant, settings, params,
                                               image[None])[:, 0]
  plots.plot_learning_curves(results, os.path.join(args.out,
                                                   'learning_curves.png'))
  plots.plot_accuracy(results, os.path.join(args.out, 'accuracy.png'))
  viz.plot_attention_maps(os.path.join(args.out, 'attention_maps.png'),
                          maps, image, (grid, grid), query)
  viz.plot_bucket_maps(os.path.join(args.out, 'bucket_maps.png'))

  elapsed = time.time() - start
  table, ordering = format_table(results), summarise_ordering(results)
  summary = {'settings': dataclasses.asdict(settings), 'variants': results,
             'smoke': settings.smoke,
             'table': table, 'ordering': ordering, 'seconds': elapsed,
             'backend': jax.default_backend(),
             'device_count': jax.device_count()}
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  print('\nTest accuracy (%) on the held-out digits:\n' + table)
  print('\n' + ordering)
  if settings.smoke:
    print('\n' + SMOKE_NOTE)
  print(f'\nTotal {elapsed:.0f}s. Plots and results.json in '
        f'{os.path.abspath(args.out)}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
