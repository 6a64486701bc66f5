r"""Offline demo: what iRPE does for a small ViT on handwritten digits.

Trains small vision transformers on scikit-learn's 8x8 handwritten digits
(1797 images that ship inside scikit-learn: nothing is downloaded), cut into
a 4x4 grid of 2x2-pixel patches, so that a model without any position
encoding sees only a bag of 16 patches. Four variants, several seeds each:

  none      no position encoding at all;
  abs       learnable absolute position embedding (plain ViT / DeiT);
  irpe_k    absolute + contextual product iRPE on keys (the paper's iRPE-K);
  irpe_qkv  absolute + contextual product iRPE on queries, keys and values.

The seeds of one variant train together under `jax.vmap`, so each variant
compiles one train step and one eval step. Prints a table of test accuracy
(mean, spread over seeds) and writes into `--outdir`:

  results.json          settings, per-seed accuracies, curves and timings;
  learning_curves.png   train loss and test accuracy per epoch;
  accuracy.png          final test accuracy per variant, each seed a dot;
  attention_maps.png    attention of one query at the first and last block
                        of a trained model of each variant (as Figure 5 of
                        the paper);
  bucket_maps.png       bucket ids of the four iRPE methods for one query.

Usage:
  python -m experiments.demo [--outdir DIR] [--seeds N] [--epochs N] [--quick]
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

import irpe_jax
from experiments import optim
from irpe_jax import models

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
  epochs: int = 30
  batch_size: int = 128
  base_lr: float = 3e-3  # peak learning rate at batch_size.
  weight_decay: float = 0.05
  warmup_epochs: int = 3
  label_smoothing: float = 0.1
  max_shift: int = 0  # random translation by up to this many pixels.
  num_seeds: int = 5
  train_subset: int = 0  # > 0: use only this many training images.


QUICK = Settings(embed_dim=16, depth=2, num_heads=2, mlp_ratio=1.0,
                 epochs=2, batch_size=32, warmup_epochs=1, num_seeds=2,
                 train_subset=256)


def load_digits(test_fraction: float = 0.25, split_seed: int = 0
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's digits as normalised `(N, 8, 8, 1)` float32 NHWC.

  Args:
    test_fraction: held-out share, stratified by class.
    split_seed: seed of the (fixed) train/test split.

  Returns:
    `(train_images, train_labels, test_images, test_labels)`.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] / 16.0
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, labels, test_size=test_fraction, stratify=labels,
      random_state=split_seed)
  mean, std = x_train.mean(), x_train.std()
  return ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


def make_model(variant: str, settings: Settings,
               num_classes: int = 10) -> Any:
  """The ViT of one variant on 8x8 single-channel digits."""
  use_abs, rpe_on = VARIANTS[variant]
  rpe_config = None
  if rpe_on is not None:
    rpe_config = irpe_jax.get_rpe_config(
        ratio=RPE_RATIO, method='product', mode='ctx', shared_head=True,
        skip=1, rpe_on=rpe_on)
  return models.VisionTransformer(
      img_size=8, patch_size=settings.patch_size, in_chans=1,
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
  total_steps = steps_per_epoch * settings.epochs
  model = make_model(variant, settings)
  schedule = optim.make_schedule(settings.base_lr, total_steps,
                                settings.warmup_epochs * steps_per_epoch)
  tx = optim.make_optimizer(schedule, settings.weight_decay)

  def step_one(params, opt_state, images, labels, rng):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 10),
                                  settings.label_smoothing)

    def loss_fn(p):
      logits = model.apply({'params': p}, images, train=True,
                           rngs={'dropout': rng})
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = jax.jit(jax.vmap(step_one), donate_argnums=(0, 1))

  @jax.jit
  def eval_step(params, images, labels):
    logits = jax.vmap(lambda p: model.apply({'params': p}, images))(params)
    return jnp.mean(jnp.argmax(logits, -1) == labels[None], axis=-1)

  start = time.time()
  # Eager init, one seed at a time: its small ops compile once for all
  # variants, where a jitted init would compile for seconds per variant.
  init_keys, step_keys = zip(*(jax.random.split(jax.random.key(s))
                               for s in seeds))
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *(
      model.init(k, jnp.zeros((1, 8, 8, 1)), train=False)['params']
      for k in init_keys))
  opt_state = jax.vmap(tx.init)(params)
  step_keys = jnp.stack(step_keys)
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
      rngs = jax.vmap(jax.random.fold_in, (0, None))(step_keys, step)
      t0 = time.time()
      params, opt_state, loss = train_step(params, opt_state, images,
                                           y_train[idx], rngs)
      losses.append(loss)
      if step == 0:
        jax.block_until_ready(loss)
        compile_s += time.time() - t0
      step += 1
    curves['train_loss'][:, epoch] = np.mean(jax.device_get(losses), axis=0)
    t0 = time.time()
    curves['test_accuracy'][:, epoch] = jax.device_get(
        eval_step(params, x_test, y_test))
    if epoch == 0:
      compile_s += time.time() - t0
    acc = curves['test_accuracy'][:, epoch]
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
                            jax.tree.leaves(params))),
      'params': params,
  }


def attention_of(variant: str, settings: Settings, params: Any,
                 image: np.ndarray) -> np.ndarray:
  """Head-averaged attention weights `(depth, L, L)` of one image."""
  model = make_model(variant, settings)
  _, state = model.apply({'params': params}, image[None],
                         mutable=['intermediates'])
  flat = jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]
  per_block = {}
  for path, value in flat:
    names = [getattr(k, 'key', str(k)) for k in path]
    block = [n for n in names if str(n).startswith('blocks_')]
    if block and 'attention_weights' in names:
      per_block[int(str(block[0]).split('_')[1])] = np.asarray(value)
  return np.stack([per_block[i][0].mean(0) for i in sorted(per_block)])


def plot_learning_curves(results: Dict[str, Any], path: str) -> None:
  """Train loss and test accuracy per epoch: mean, shaded min to max."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, res in results.items():
    for ax, key in zip(axes, ('train_loss', 'test_accuracy')):
      curve = np.asarray(res['curves'][key])
      epochs = np.arange(1, curve.shape[1] + 1)
      line, = ax.plot(epochs, curve.mean(0), label=res['description'])
      ax.fill_between(epochs, curve.min(0), curve.max(0), alpha=0.2,
                      color=line.get_color())
  axes[0].set(xlabel='epoch', ylabel='train loss (label smoothed)',
              title='Training loss')
  axes[1].set(xlabel='epoch', ylabel='test accuracy', title='Test accuracy')
  axes[1].legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_accuracy(results: Dict[str, Any], path: str) -> None:
  """Final test accuracy per variant: mean +- std bar, seeds as dots."""
  fig, ax = plt.subplots(figsize=(7, 4))
  names = list(results)
  for i, name in enumerate(names):
    res = results[name]
    ax.bar(i, res['mean'], yerr=res['std'], capsize=6, alpha=0.6)
    ax.scatter(np.full(len(res['test_accuracy']), i), res['test_accuracy'],
               color='k', zorder=3, s=14)
  ax.set_xticks(range(len(names)),
                [results[n]['description'] for n in names], rotation=15,
                ha='right')
  low = min(min(r['test_accuracy']) for r in results.values())
  ax.set_ylim(max(0.0, low - 0.05), 1.0)
  ax.set(ylabel='test accuracy', title='Digits, final test accuracy')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_attention_maps(maps: Dict[str, np.ndarray], image: np.ndarray,
                        grid_shape: Tuple[int, int], query: Tuple[int, int],
                        path: str) -> None:
  """Attention of one query patch over all patches, first and last block.

  Args:
    maps: variant -> head-averaged attention `(depth, L, L)`, class token
      first.
    image: the `(H, W, 1)` input image.
    grid_shape: `(rows, cols)` of the patch grid.
    query: `(row, col)` of the query patch.
    path: where the PNG goes.
  """
  names = list(maps)
  fig, axes = plt.subplots(len(names), 3, figsize=(7.5, 2.4 * len(names)),
                           squeeze=False)
  rows, cols = grid_shape
  patch = image.shape[0] // rows
  q_token = 1 + query[0] * cols + query[1]  # skip the class token.
  centre = (query[1] * patch + (patch - 1) / 2,
            query[0] * patch + (patch - 1) / 2)
  extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
  for row, name in enumerate(names):
    att = maps[name]
    axes[row, 0].imshow(image[..., 0], cmap='gray')
    axes[row, 0].set_ylabel(DESCRIPTIONS[name], fontsize=8)
    for col, block in ((1, 0), (2, att.shape[0] - 1)):
      axes[row, col].imshow(att[block, q_token, 1:].reshape(rows, cols),
                            cmap='viridis', extent=extent)
      if row == 0:
        axes[row, col].set_title(f'block {block + 1} attention', fontsize=9)
    for ax in axes[row]:
      ax.plot(*centre, 'r+', markersize=12, mew=2)
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_title('input (+ = query)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_bucket_maps(path: str, size: int = 15) -> None:
  """Bucket id of every key for the centre query, for the four methods."""
  methods = (('euc', 'euclidean'), ('quant', 'quantization'),
             ('cross_rows', 'cross (rows)'), ('cross_cols', 'cross (cols)'),
             ('product', 'product'))
  centre = (size // 2) * size + size // 2
  fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4))
  for ax, (method, title) in zip(axes, methods):
    ids, num = irpe_jax.get_bucket_ids_2d(
        method, size, size, 0, RPE_RATIO, 2 * RPE_RATIO, 8 * RPE_RATIO)
    grid = np.asarray(ids)[centre].reshape(size, size)
    ax.imshow(grid, cmap='tab20' if num <= 20 else 'viridis')
    for (r, c), v in np.ndenumerate(grid):
      ax.text(c, r, str(v), ha='center', va='center', fontsize=5)
    ax.plot(size // 2, size // 2, 'r+', markersize=10, mew=2)
    ax.set_title(f'{title}: {num} buckets', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f'iRPE bucket ids on a {size}x{size} grid for the centre '
               f'query (ratio {RPE_RATIO})', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--outdir', default='irpe_demo',
                      help='where plots and results.json go')
  parser.add_argument('--seeds', type=int, default=None,
                      help='seeds per variant (default 5; 2 with --quick)')
  parser.add_argument('--epochs', type=int, default=None,
                      help='training epochs (default 30; 2 with --quick)')
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help='comma-separated subset of ' + ','.join(VARIANTS))
  parser.add_argument('--quick', action='store_true',
                      help='tiny models and data, for tests (~20 s)')
  return parser.parse_args(argv)


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
  os.makedirs(args.outdir, exist_ok=True)
  start = time.time()
  data = load_digits()
  if settings.train_subset:
    data = (data[0][:settings.train_subset], data[1][:settings.train_subset],
            *data[2:])
  seeds = list(range(settings.num_seeds))
  grid = 8 // settings.patch_size
  print(f'Digits: {len(data[0])} train / {len(data[2])} test images of 8x8 '
        f'as {grid}x{grid} patches; {len(seeds)} seeds x {settings.epochs} '
        f'epochs per variant on {jax.device_count()} '
        f'{jax.default_backend()} device(s).', flush=True)

  results = {}
  for variant in variants:
    results[variant] = train_variant(variant, settings, data, seeds)

  query = (1, 2)
  image = data[2][0]
  maps = {}
  for variant in variants:
    params = jax.tree.map(lambda x: x[0], results[variant].pop('params'))
    maps[variant] = attention_of(variant, settings, params, image)
  plot_learning_curves(results, os.path.join(args.outdir,
                                             'learning_curves.png'))
  plot_accuracy(results, os.path.join(args.outdir, 'accuracy.png'))
  plot_attention_maps(maps, image, (grid, grid), query,
                      os.path.join(args.outdir, 'attention_maps.png'))
  plot_bucket_maps(os.path.join(args.outdir, 'bucket_maps.png'))

  elapsed = time.time() - start
  table, ordering = format_table(results), summarise_ordering(results)
  summary = {'settings': dataclasses.asdict(settings), 'variants': results,
             'table': table, 'ordering': ordering, 'seconds': elapsed,
             'backend': jax.default_backend(),
             'device_count': jax.device_count()}
  with open(os.path.join(args.outdir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  print('\nTest accuracy (%) on the held-out digits:\n' + table)
  print('\n' + ordering)
  print(f'\nTotal {elapsed:.0f}s. Plots and results.json in '
        f'{os.path.abspath(args.outdir)}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
