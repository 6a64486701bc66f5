"""Pictures of iRPE: bucket maps, attention maps, attention by offset.

Works with any `irpe_jax.models.VisionTransformer` (or any Linen model that
sows `intermediates/attention_weights` as `IRPEAttention` does). The plots
need matplotlib, which the library does not: it is imported inside the
plotting functions (`pip install "irpe_jax[experiments]"`). The array
helpers (`attention_weights`, `attention_by_offset`) need only numpy/jax.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from irpe_jax import buckets
from irpe_jax import config as config_lib

# Panels of `plot_bucket_maps`: (method, bucket table, title). The cross
# method adds two tables, one for row offsets and one for column offsets.
BUCKET_PANELS = (('euc', None, 'euclidean'), ('quant', None, 'quantization'),
                 ('cross_rows', 'rows', 'cross: row table'),
                 ('cross_cols', 'cols', 'cross: column table'),
                 ('product', None, 'product'))


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('irpe_jax.viz plots need matplotlib: pip install '
                      'matplotlib (or "irpe_jax[experiments]").') from e
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _check_query(query: Tuple[int, int], grid: Tuple[int, int]) -> None:
  if not (0 <= query[0] < grid[0] and 0 <= query[1] < grid[1]):
    raise ValueError(f'query={query} is outside the {grid[0]}x{grid[1]} '
                     'grid.')


def bucket_map(method: str, size: Tuple[int, int], query: Tuple[int, int],
               ratio: Optional[float] = None) -> Tuple[np.ndarray, int]:
  """Bucket id of every key for one query of a grid (no skip token).

  Args:
    method: 'euc', 'quant', 'cross_rows', 'cross_cols' or 'product' (or
      their release aliases).
    size: `(height, width)` of the grid.
    query: `(row, col)` of the query.
    ratio: the iRPE ratio (alpha, beta, gamma = r, 2r, 8r); None takes the
      method's own ratio from the release (`config.METHOD_RATIOS`).

  Returns:
    `(ids, num_buckets)`: ids `(height, width)` int32.
  """
  _check_query(query, size)
  canonical = buckets.canonical_method(method)
  if ratio is None:
    family = buckets.CROSS if canonical in (
        buckets.CROSS_ROWS, buckets.CROSS_COLS) else canonical
    ratio = config_lib.METHOD_RATIOS[family]
  alpha, beta, gamma = config_lib.piecewise_params(ratio)
  ids, num = buckets.get_bucket_ids_2d(canonical, size[0], size[1], 0, alpha,
                                       beta, gamma)
  row = query[0] * size[1] + query[1]
  return np.asarray(ids)[row].reshape(size), int(num)


def plot_bucket_maps(path: str, size: int = 15,
                     ratios: Optional[Dict[str, float]] = None,
                     annotate: bool = True) -> None:
  """Bucket ids of the centre query of a grid, one panel per method.

  Each method uses its own ratio (the release's: euclidean 20, quantization
  33, cross 20, product 1.9), so each shows its usual number of buckets.

  Args:
    path: where the PNG goes.
    size: side of the square grid.
    ratios: method -> ratio, overriding the release's.
    annotate: write each id in its cell.
  """
  plt = _pyplot()
  ratios = ratios or {}
  centre = (size // 2, size // 2)
  fig, axes = plt.subplots(1, len(BUCKET_PANELS),
                           figsize=(3.1 * len(BUCKET_PANELS), 3.6))
  for ax, (method, _, title) in zip(axes, BUCKET_PANELS):
    family = 'cross' if method.startswith('cross') else method
    ids, num = bucket_map(method, (size, size), centre, ratios.get(family))
    ratio = ratios.get(family, config_lib.METHOD_RATIOS[
        buckets.canonical_method(family)])
    image = ax.imshow(ids, cmap='viridis')
    if annotate:
      for (r, c), v in np.ndenumerate(ids):
        ax.text(c, r, str(v), ha='center', va='center', fontsize=4,
                color='w' if v < num / 2 else 'k')
    ax.plot(*centre[::-1], 'r+', markersize=10, mew=2)
    ax.set_title(f'{title}\nratio {ratio:g}: {num} buckets', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  fig.suptitle(f'iRPE bucket of each key for the centre query (+) of a '
               f'{size}x{size} grid', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def attention_weights(model: Any, variables: Any, images: Any,
                      **kwargs: Any) -> np.ndarray:
  """The sown attention weights of every block.

  Args:
    model: a Linen model whose attention sows
      `intermediates/.../attention_weights` (e.g. `VisionTransformer`, or
      `DETR`, whose encoder layers sow theirs).
    variables: its variables (`{'params': ...}`).
    images: the model's input `(B, H, W, C)`.
    **kwargs: passed to `model.apply` (e.g. `train=False`, or DETR's
      `pixel_mask`).

  Returns:
    `(depth, B, heads, L, L)` float32, blocks in order of their names.
  """
  _, state = model.apply(variables, images, mutable=['intermediates'],
                         **kwargs)
  found = []
  for path, value in jax.tree_util.tree_flatten_with_path(
      state['intermediates'])[0]:
    names = [str(getattr(k, 'key', k)) for k in path]
    if 'attention_weights' in names:
      found.append((names, np.asarray(value, np.float32)))
  if not found:
    raise ValueError('The model sowed no attention_weights: is it built on '
                     'IRPEAttention?')

  def order(item):
    # ViT names its blocks `blocks_{i}`, DETR's encoder `layers_{i}`.
    block = [n for n in item[0] if n.startswith(('blocks_', 'layers_'))]
    return int(block[0].split('_')[1]) if block else 0

  return np.stack([value for _, value in sorted(found, key=order)])


def plot_attention_maps(path: str, maps: Dict[str, np.ndarray],
                        image: np.ndarray, grid: Tuple[int, int],
                        query: Tuple[int, int],
                        blocks: Optional[Sequence[int]] = None,
                        skip: int = 1) -> None:
  """Attention of one query over the grid, per model (row) and block.

  Args:
    path: where the PNG goes.
    maps: row label -> head-averaged attention `(depth, L, L)` of `image`.
    image: the `(H, W)` or `(H, W, C)` input image.
    grid: `(rows, cols)` of the patch grid.
    query: `(row, col)` of the query patch.
    blocks: which blocks to show (default: the first and the last).
    skip: tokens before the patches (1: the class token).
  """
  plt = _pyplot()
  _check_query(query, grid)
  labels = list(maps)
  depth = next(iter(maps.values())).shape[0]
  blocks = list(blocks) if blocks is not None else sorted({0, depth - 1})
  rows, cols = grid
  q_token = skip + query[0] * cols + query[1]
  shown = {(label, b): maps[label][b, q_token, skip:].reshape(rows, cols)
           for label in labels for b in blocks}
  vmax = max(float(v.max()) for v in shown.values())  # one shared scale.
  image = np.asarray(image)
  # Integer pixels are 0..255; matplotlib reads float RGB as 0..1.
  image = (image / 255.0 if np.issubdtype(image.dtype, np.integer)
           else image.astype(np.float32))
  image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
  height, width = image.shape[:2]
  extent = (-0.5, width - 0.5, height - 0.5, -0.5)
  centre = ((query[1] + 0.5) * width / cols - 0.5,
            (query[0] + 0.5) * height / rows - 0.5)
  fig, axes = plt.subplots(len(labels), 1 + len(blocks),
                           figsize=(2.6 * (1 + len(blocks)) + 0.8,
                                    2.4 * len(labels)), squeeze=False)
  last = None
  for r, label in enumerate(labels):
    axes[r, 0].imshow(image, cmap='gray' if image.ndim == 2 else None)
    axes[r, 0].set_ylabel(label, fontsize=8)
    for c, block in enumerate(blocks, start=1):
      last = axes[r, c].imshow(shown[(label, block)], cmap='viridis',
                               extent=extent, vmin=0.0, vmax=vmax)
      if r == 0:
        axes[r, c].set_title(f'block {block + 1} of {depth}', fontsize=9)
    for ax in axes[r]:
      ax.plot(*centre, 'r+', markersize=12, mew=2)
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_title('input (+ = query)', fontsize=9)
  fig.colorbar(last, ax=axes[:, 1:].ravel().tolist(), shrink=0.8,
               label='attention weight (heads averaged)')
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


def attention_by_offset(weights: np.ndarray, grid: Tuple[int, int],
                        skip: int = 1) -> np.ndarray:
  """Mean attention by relative offset `(key - query)`, over all queries.

  Args:
    weights: attention `(..., L, L)` with `L = skip + rows * cols`; leading
      axes (images, heads) are averaged over.
    grid: `(rows, cols)`.
    skip: tokens before the patches (not counted).

  Returns:
    `(2 rows - 1, 2 cols - 1)`: entry `(dr + rows - 1, dc + cols - 1)` is
    the mean weight a patch query gives the key `dr` rows and `dc` columns
    away, over the queries that have such a key.
  """
  rows, cols = grid
  patches = np.asarray(weights, np.float64)[..., skip:, skip:]
  patches = patches.reshape(-1, rows * cols, rows * cols).mean(0)
  r, c = np.divmod(np.arange(rows * cols), cols)
  dr = (r[None, :] - r[:, None]) + rows - 1
  dc = (c[None, :] - c[:, None]) + cols - 1
  total = np.zeros((2 * rows - 1, 2 * cols - 1))
  count = np.zeros_like(total)
  np.add.at(total, (dr, dc), patches)
  np.add.at(count, (dr, dc), 1)
  return total / count


def plot_attention_by_offset(path: str, maps: Dict[str, np.ndarray],
                             title: str = '') -> None:
  """2-D maps of mean attention by offset, one panel each, shared scale.

  Args:
    path: where the PNG goes.
    maps: panel title -> `attention_by_offset` output.
    title: the figure's title.
  """
  plt = _pyplot()
  labels = list(maps)
  vmax = max(float(m.max()) for m in maps.values())
  fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels) + 1,
                                                     3.4), squeeze=False,
                           layout='constrained')
  image = None
  for ax, label in zip(axes[0], labels):
    m = maps[label]
    half_r, half_c = (m.shape[0] - 1) // 2, (m.shape[1] - 1) // 2
    image = ax.imshow(m, cmap='viridis', vmin=0.0, vmax=vmax,
                      extent=(-half_c - 0.5, half_c + 0.5, half_r + 0.5,
                              -half_r - 0.5))
    ax.plot(0, 0, 'r+', markersize=10, mew=2)
    step = max(1, half_c // 3)
    ax.set_xticks(range(-(half_c // step) * step, half_c + 1, step))
    ax.set_yticks(range(-(half_r // step) * step, half_r + 1, step))
    ax.set_title(label, fontsize=9)
    ax.set_xlabel('column offset', fontsize=8)
  axes[0, 0].set_ylabel('row offset', fontsize=8)
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8,
               label='mean attention weight')
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
