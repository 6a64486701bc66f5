"""The demo's figures: learning curves, accuracies, attention and buckets."""

from typing import Any, Dict, Tuple

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

import irpe_jax


def plot_learning_curves(results: Dict[str, Any], path: str) -> None:
  """Train loss and test accuracy per epoch: mean, shaded min to max.

  Args:
    results: variant -> `{'description', 'curves': {'train_loss',
      'test_accuracy'}}`, each curve `(seeds, epochs)`.
    path: where the PNG goes.
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for res in results.values():
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
  """Final test accuracy per variant: mean +- std bar, seeds as dots.

  Args:
    results: variant -> `{'description', 'mean', 'std', 'test_accuracy'}`
      (one accuracy per seed).
    path: where the PNG goes.
  """
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
    maps: row label (a variant's description) -> head-averaged attention
      `(depth, L, L)`, class token first.
    image: the `(H, W, 1)` input image.
    grid_shape: `(rows, cols)` of the patch grid.
    query: `(row, col)` of the query patch.
    path: where the PNG goes.
  """
  labels = list(maps)
  fig, axes = plt.subplots(len(labels), 3, figsize=(7.5, 2.4 * len(labels)),
                           squeeze=False)
  rows, cols = grid_shape
  patch = image.shape[0] // rows
  q_token = 1 + query[0] * cols + query[1]  # skip the class token.
  centre = (query[1] * patch + (patch - 1) / 2,
            query[0] * patch + (patch - 1) / 2)
  extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
  for row, label in enumerate(labels):
    att = maps[label]
    axes[row, 0].imshow(image[..., 0], cmap='gray')
    axes[row, 0].set_ylabel(label, fontsize=8)
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


def plot_bucket_maps(path: str, ratio: float, size: int = 15) -> None:
  """Bucket id of every key for the centre query, for the four methods.

  Args:
    path: where the PNG goes.
    ratio: the iRPE ratio (alpha, beta, gamma = ratio, 2 ratio, 8 ratio).
    size: side of the square grid.
  """
  methods = (('euc', 'euclidean'), ('quant', 'quantization'),
             ('cross_rows', 'cross (rows)'), ('cross_cols', 'cross (cols)'),
             ('product', 'product'))
  centre = (size // 2) * size + size // 2
  fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4))
  for ax, (method, title) in zip(axes, methods):
    ids, num = irpe_jax.get_bucket_ids_2d(
        method, size, size, 0, ratio, 2 * ratio, 8 * ratio)
    grid = np.asarray(ids)[centre].reshape(size, size)
    ax.imshow(grid, cmap='tab20' if num <= 20 else 'viridis')
    for (r, c), v in np.ndenumerate(grid):
      ax.text(c, r, str(v), ha='center', va='center', fontsize=5)
    ax.plot(size // 2, size // 2, 'r+', markersize=10, mew=2)
    ax.set_title(f'{title}: {num} buckets', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f'iRPE bucket ids on a {size}x{size} grid for the centre '
               f'query (ratio {ratio})', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
