"""The in-block iRPE lookup `z[i, ids[i, j]]` over key blocks of grid rows.

A blockwise attention block reads, for each query `i` of its query block
and each key `j` of its key block, `z[i, ids[i, j]]` from the query's
`(nb,)` bucket values: the contextual rpe_k term on the logits, and in the
backward pass the gradient of the weights from that of the v term's bucket
sums. As a per-element gather this is one indexed load per logit; at
L = 4097 on CPU it was about half of iRPE-K's cost over plain blockwise
attention (an ablation with the gather left out).

With the bucket geometry's split of an offset into a row class and a column
class (`BucketGeometry`), and a key block of whole grid rows, the lookup
factors:

    z[i, ids[i, (rj, cj)]] = expanded[i, row_class(ri - rj), cj],
    expanded[i, a, cj] = z[i, pair_buckets[a, col_class(ci - cj)]],

`expanded` is `(nA, w)` per query, made once per query block, and each key
block copies `(w,)` rows of it, one per query and key row: `O(bq * rows)`
indexed copies instead of `O(bq * bk)` indexed loads.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from irpe_jax.buckets import BucketGeometry


def grid_coords(geometry: BucketGeometry, tokens: jax.Array
                ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """`(row, col, spatial)` of int32 token indices on the geometry's grid.

  Skip tokens and tokens past `L` are not spatial; their row and column are
  clipped into the grid (any value; the callers mask them).
  """
  position = tokens - geometry.skip
  spatial = (position >= 0) & (tokens < geometry.length)
  position = jnp.clip(position, 0, geometry.height * geometry.width - 1)
  return position // geometry.width, position % geometry.width, spatial


class RowLookup:
  """`z[i, ids[i, j]]` of a query block, for key blocks of whole grid rows.

  Args:
    geometry: the bucket geometry of `z`'s buckets.
    q_tokens: `(bq,)` int32 token indices of the query block.
    z: `(B, H, bq, nb)` bucket values of the block's queries.
  """

  def __init__(self, geometry: BucketGeometry, q_tokens: jax.Array,
               z: jax.Array):
    g = geometry
    self._geometry = g
    self._rows, cols, self._spatial = grid_coords(g, q_tokens)
    n_rows, n_cols = g.pair_buckets.shape
    by_pair = jnp.take(z, jnp.asarray(g.pair_buckets.reshape(-1)), axis=-1)
    by_pair = by_pair.reshape(z.shape[:-1] + (n_rows, n_cols))
    # col_classes[i, cj]: the column class of query i's offset to column cj.
    col_classes = jnp.asarray(g.col_class)[
        cols[:, None] - jnp.arange(g.width, dtype=jnp.int32)[None, :] +
        g.width - 1]
    index = jnp.broadcast_to(col_classes[:, None, :],
                             by_pair.shape[:-1] + (g.width,))
    # (B, H, bq, nA, w): one indexed load per (query, row class, column).
    self._expanded = jnp.take_along_axis(by_pair, index, axis=-1,
                                         mode='clip')
    self._skip_values = z[..., g.num_buckets - 1] if g.skip else None

  def __call__(self, first_row, num_rows: int) -> jax.Array:
    """`(B, H, bq, num_rows * w)`: the lookup for the keys of grid rows
    `first_row, ..., first_row + num_rows - 1` (traced `first_row`)."""
    g = self._geometry
    key_rows = first_row + jnp.arange(num_rows, dtype=jnp.int32)
    row_classes = jnp.asarray(g.row_class)[
        self._rows[:, None] - key_rows[None, :] + g.height - 1]  # (bq, rows)
    expanded = self._expanded
    lead = expanded.shape[:-2]  # (B, H, bq)
    n_rows = expanded.shape[-2]
    # Row copies: each (query, key row) takes a contiguous (w,) row of
    # `expanded`, a gather of whole rows from its flat (B * H * bq * nA, w)
    # view, whose output is already in the (B, H, bq, rows * w) layout.
    rows_before = jnp.arange(lead[0] * lead[1], dtype=jnp.int32)[:, None] * (
        lead[2] * n_rows) + (jnp.arange(lead[2], dtype=jnp.int32) *
                             n_rows)[None, :]
    index = rows_before[:, :, None] + row_classes[None]
    out = jnp.take(expanded.reshape(-1, g.width), index.reshape(-1), axis=0,
                   mode='clip')
    out = out.reshape(lead + (num_rows * g.width,))
    if self._skip_values is not None:
      # A skip query's pairs all fall in the skip bucket.
      out = jnp.where(self._spatial[:, None], out,
                      self._skip_values[..., None])
    return out
