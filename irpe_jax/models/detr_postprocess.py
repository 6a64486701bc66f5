"""DETR's predictions as detections in pixels, as the release's `PostProcess`.

Each query becomes one detection: its score and label are the largest class
probability of the softmax without the no-object class, and its box is the
predicted `(cx, cy, w, h)` as `(x0, y0, x1, y1)` scaled to the original image
size (before resizing and padding). No threshold, no NMS: keep the
detections above a score, as DETR's demos do.
"""

from typing import Dict, Mapping

import jax
import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """`(..., 4)` centre, width, height -> corners `(x0, y0, x1, y1)`."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                   axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """Inverse of `box_cxcywh_to_xyxy`."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def post_process(outputs: Mapping[str, jax.Array], target_sizes: jax.Array
                 ) -> Dict[str, jax.Array]:
  """Scores, labels and pixel boxes of every query.

  Args:
    outputs: `pred_logits (B, Q, K + 1)` (the last class is no-object) and
      `pred_boxes (B, Q, 4)` as DETR returns them.
    target_sizes: `(B, 2)` `(height, width)` of each original image.

  Returns:
    `scores (B, Q)`, `labels (B, Q)` int32 in `[0, K)`, and `boxes
    (B, Q, 4)` `(x0, y0, x1, y1)` in pixels of the original image.
  """
  logits, boxes = outputs['pred_logits'], outputs['pred_boxes']
  if logits.ndim != 3 or boxes.shape != logits.shape[:2] + (4,):
    raise ValueError(f'pred_logits must be (B, Q, K + 1) and pred_boxes '
                     f'(B, Q, 4), got {logits.shape} and {boxes.shape}.')
  target_sizes = jnp.asarray(target_sizes)
  if target_sizes.shape != (logits.shape[0], 2):
    raise ValueError(f'target_sizes must be (B, 2) = ({logits.shape[0]}, 2) '
                     f'(height, width), got {target_sizes.shape}.')
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
  height, width = (target_sizes[:, i].astype(jnp.float32) for i in (0, 1))
  scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
  return {
      'scores': probs.max(axis=-1),
      'labels': probs.argmax(axis=-1).astype(jnp.int32),
      'boxes': box_cxcywh_to_xyxy(boxes.astype(jnp.float32)) * scale,
  }
