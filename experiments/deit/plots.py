"""The demo's figures: learning curves and accuracies (`irpe_jax.viz` draws
the attention and bucket maps)."""

from typing import Any, Dict

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np



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
