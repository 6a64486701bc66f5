"""iRPE bucket lookups inside a Pallas kernel, with no gather and no table.

A fused kernel cannot read the `(L, L)` bucket ids (they are the memory the
kernel exists to save), and neither Mosaic (TPU) nor Triton (GPU, through
Pallas) takes a general gather of a value held in registers. So a block
computes its ids from token coordinates, and looks them up by comparison:

- Ids. The geometry's split of an offset into a row class and a column
  class (`BucketGeometry`) gives each spatial pair a *slot*,
  `row_class(dr) * num_col_classes + col_class(dc)`. A class, as a function
  of the offset, is a step function, so it is a sum of a few comparisons
  with static thresholds (`_Steps`): no table is read. Pairs that touch a
  non-spatial token (a skip token or block padding) take the last slot.
- Values. The caller re-indexes each `(..., nb)` table or bucket-value
  array by slot outside the kernel (`slot_buckets`, a cheap XLA gather over
  `L * P` values). Inside, a lookup `values[i, slot[i, j]]` walks the `P`
  slots: for each, one comparison and one select over the block. The
  transposed scatter (bucket sums and gradients) walks them the same way
  with a masked row sum, so every output element has one writer and the
  result is deterministic (no atomics).

The cost is `O(P)` vector operations per logit (`P` is 50 for the
release's DeiT configurations), on top of flash attention's `O(D)` matrix
work: the kernels trade speed for a form that lowers on both backends.
"""

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from irpe_jax.buckets import BucketGeometry


@dataclasses.dataclass(frozen=True)
class _Steps:
  """A class as a step function of the offset: `base + sum_t step_t *
  (offset >= threshold_t)` over the offsets of one axis."""
  base: int
  steps: Tuple[Tuple[int, int], ...]

  @classmethod
  def of(cls, classes: np.ndarray) -> '_Steps':
    """From `classes[d + n - 1]`, the class of each offset `d` in
    `[-(n - 1), n - 1]`."""
    radius = (len(classes) - 1) // 2
    changes = np.nonzero(np.diff(classes))[0] + 1
    return cls(int(classes[0]), tuple(
        (int(i) - radius, int(classes[i] - classes[i - 1])) for i in changes))

  def __call__(self, offsets: jax.Array) -> jax.Array:
    out = jnp.full(offsets.shape, self.base, jnp.int32)
    for threshold, step in self.steps:
      out = out + jnp.where(offsets >= threshold, step, 0)
    return out


@dataclasses.dataclass(frozen=True)
class KernelGeometry:
  """The static side of one geometry's in-kernel lookups (hashable).

  Attributes:
    geometry: the bucket geometry.
    num_slots: `P = num_row_classes * num_col_classes + 1`; the last slot
      is the non-spatial one.
  """
  geometry: BucketGeometry
  num_slots: int
  num_col_classes: int
  rows: _Steps
  cols: _Steps
  # Classes of the negated offsets, for the transposed (rpe_q) terms.
  rows_negated: _Steps
  cols_negated: _Steps

  @property
  def slot_buckets(self) -> np.ndarray:
    """`(P,)` int32 bucket of each slot (the last: the skip bucket)."""
    g = self.geometry
    return np.append(g.pair_buckets.reshape(-1),
                     g.num_buckets - 1).astype(np.int32)

  def slots(self, row_offsets: jax.Array, col_offsets: jax.Array,
            spatial: jax.Array, transposed: bool) -> jax.Array:
    """int32 slots of a block's pairs, from their `(ri - rj, ci - cj)`;
    transposed, of the pairs `(j, i)`."""
    rows, cols = ((self.rows_negated, self.cols_negated) if transposed
                  else (self.rows, self.cols))
    slots = rows(row_offsets) * self.num_col_classes + cols(col_offsets)
    return jnp.where(spatial, slots, self.num_slots - 1)


@functools.lru_cache(maxsize=None)
def kernel_geometry(geometry: BucketGeometry) -> KernelGeometry:
  g = geometry
  n_rows, n_cols = g.pair_buckets.shape
  return KernelGeometry(
      geometry=g, num_slots=n_rows * n_cols + 1, num_col_classes=n_cols,
      rows=_Steps.of(g.row_class), cols=_Steps.of(g.col_class),
      rows_negated=_Steps.of(g.row_class[::-1]),
      cols_negated=_Steps.of(g.col_class[::-1]))


def token_coords(geometry: BucketGeometry, length: int, query: bool
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """`(rows, cols)` int32 grid coordinates of `length` tokens (the last
  ones padding).

  A non-spatial token's row is `3 * height` as a query and `-3 * height`
  as a key, so that a pair is spatial exactly when `|ri - rj| < height`
  (see `spatial_pairs`).
  """
  g = geometry
  tokens = np.arange(length)
  position = tokens - g.skip
  spatial = (position >= 0) & (tokens < g.length)
  position = np.clip(position, 0, g.height * g.width - 1)
  sentinel = 3 * g.height if query else -3 * g.height
  return (np.where(spatial, position // g.width, sentinel).astype(np.int32),
          (position % g.width).astype(np.int32))


def spatial_pairs(row_offsets: jax.Array, height: int) -> jax.Array:
  """Which pairs of a block are both spatial, from `ri - rj` of the rows
  `token_coords` gives."""
  return (row_offsets < height) & (row_offsets > -height)


def _slot_index(width: int, axis: int) -> jax.Array:
  """int32 `0 .. width - 1` along `axis` of a 2-D shape, 1 on the other."""
  shape = (1, width) if axis == 1 else (width, 1)
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _lookup(values: jax.Array, slots: jax.Array, num_slots: int,
            axis: int) -> jax.Array:
  """`slots`' entries of `values`, whose slots run along `axis`."""
  index = _slot_index(values.shape[axis], axis)

  def one_slot(slot, out):
    picked = jnp.sum(jnp.where(index == slot, values, 0.0), axis=axis,
                     keepdims=True)
    return jnp.where(slots == slot, picked, out)

  return jax.lax.fori_loop(0, num_slots, one_slot,
                           jnp.zeros(slots.shape, jnp.float32))


def _scatter(a: jax.Array, slots: jax.Array, num_slots: int, width: int,
             axis: int) -> jax.Array:
  """Transpose of `_lookup`: `a` summed by slot along `axis`, the slots
  laid out along it (`width` of them)."""
  index = _slot_index(width, axis)
  shape = (a.shape[0], width) if axis == 1 else (width, a.shape[1])

  def one_slot(slot, out):
    summed = jnp.sum(jnp.where(slots == slot, a, 0.0), axis=axis,
                     keepdims=True)
    return out + jnp.where(index == slot, summed, 0.0)

  return jax.lax.fori_loop(0, num_slots, one_slot,
                           jnp.zeros(shape, jnp.float32))


def lookup_rows(values: jax.Array, slots: jax.Array, num_slots: int
                ) -> jax.Array:
  """`out[i, j] = values[i, slots[i, j]]` (`values (n or 1, W)` float32,
  `slots (n, m)`)."""
  return _lookup(values, slots, num_slots, axis=1)


def lookup_cols(values_t: jax.Array, slots: jax.Array, num_slots: int
                ) -> jax.Array:
  """`out[i, j] = values_t[slots[i, j], j]` (`values_t (W, m)` float32,
  the per-key values with slots leading)."""
  return _lookup(values_t, slots, num_slots, axis=0)


def scatter_rows(a: jax.Array, slots: jax.Array, num_slots: int,
                 width: int) -> jax.Array:
  """Transpose of `lookup_rows`: `out[i, s] = sum_{j: slots[i, j] = s}
  a[i, j]`, `(n, width)` float32."""
  return _scatter(a, slots, num_slots, width, axis=1)


def scatter_cols(a: jax.Array, slots: jax.Array, num_slots: int,
                 width: int) -> jax.Array:
  """Transpose of `lookup_cols`: `out[s, j] = sum_{i: slots[i, j] = s}
  a[i, j]`, `(width, m)` float32."""
  return _scatter(a, slots, num_slots, width, axis=0)
