"""DETR's Hungarian matching of queries to objects, on device, per image.

The release's `HungarianMatcher` (Carion et al., ECCV 2020, `models/
matcher.py`) solves, for each image, the assignment of its targets to
distinct queries that minimises

  cost_class * -p(target class) + cost_bbox * L1(boxes)
      + cost_giou * -GIoU(boxes),

with `p` the softmax over all logits (no-object included) and boxes as
`(cx, cy, w, h)` for the L1 and as corners for the GIoU. The release solves
it on the host with `scipy.optimize.linear_sum_assignment`; here it is
`optax.assignment.hungarian_algorithm`, vmapped over the batch inside the
jitted step (no host round trip).

Targets come padded to a fixed count `T` with a validity mask, so that the
shapes (and the compiled step) do not depend on how many objects an image
holds. A padded target's row of the cost matrix is constant: whichever query
it takes, the optimum over the real targets is unchanged, because `Q >= T`
leaves enough free queries.
"""

from typing import Mapping, Tuple

import jax
import jax.numpy as jnp
import optax

from irpe_jax.models import detr_postprocess

# A well-formed stand-in for padded target boxes, so GIoU never divides by 0.
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


def box_area(boxes: jax.Array) -> jax.Array:
  """`(..., 4)` corners `(x0, y0, x1, y1)` -> `(...)` areas."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array
            ) -> Tuple[jax.Array, jax.Array]:
  """Pairwise IoU and union of corner boxes `(N, 4)`, `(M, 4)` -> `(N, M)`."""
  area1, area2 = box_area(boxes1), box_area(boxes2)
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2[None, :] - inter
  return inter / union, union


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise GIoU (Rezatofighi et al., CVPR 2019) of corner boxes.

  Args:
    boxes1: `(N, 4)` `(x0, y0, x1, y1)` with `x1 >= x0`, `y1 >= y0`.
    boxes2: `(M, 4)` likewise.

  Returns:
    `(N, M)` values in `[-1, 1]`: the IoU minus the part of the smallest
    enclosing box that the union leaves uncovered.
  """
  iou, union = box_iou(boxes1, boxes2)
  lt = jnp.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  area = wh[..., 0] * wh[..., 1]
  return iou - (area - union) / area


def padded_target_boxes(boxes: jax.Array, valid: jax.Array) -> jax.Array:
  """`boxes (..., T, 4)` with padded entries replaced by a well-formed box."""
  return jnp.where(valid[..., None], boxes,
                   jnp.asarray(_DUMMY_BOX, boxes.dtype))


def match_cost(logits: jax.Array, boxes: jax.Array, labels: jax.Array,
               target_boxes: jax.Array, cost_class: float = 1.0,
               cost_bbox: float = 5.0, cost_giou: float = 2.0) -> jax.Array:
  """The release's matching cost of one image, targets by queries.

  Args:
    logits: `(Q, K + 1)` class logits (the last is no-object).
    boxes: `(Q, 4)` predicted `(cx, cy, w, h)`.
    labels: `(T,)` int target classes in `[0, K)`.
    target_boxes: `(T, 4)` target `(cx, cy, w, h)`.
    cost_class: weight of the class probability.
    cost_bbox: weight of the L1 distance of the boxes.
    cost_giou: weight of the GIoU.

  Returns:
    `(T, Q)` float32 costs.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  boxes = boxes.astype(jnp.float32)
  target_boxes = target_boxes.astype(jnp.float32)
  class_term = -probs[:, labels].T
  l1 = jnp.abs(target_boxes[:, None, :] - boxes[None, :, :]).sum(-1)
  giou = generalized_box_iou(
      detr_postprocess.box_cxcywh_to_xyxy(target_boxes),
      detr_postprocess.box_cxcywh_to_xyxy(boxes))
  return cost_bbox * l1 + cost_class * class_term - cost_giou * giou


def assign(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """The query of each target under a minimum-cost assignment.

  Args:
    cost: `(T, Q)` costs, `T <= Q`.
    valid: `(T,)` bool; rows of padded targets are ignored.

  Returns:
    `(T,)` int32 distinct query indices; those of padded targets are
    arbitrary (distinct from the others).
  """
  cost = jnp.where(valid[:, None], cost, 0.0)
  rows, cols = optax.assignment.hungarian_algorithm(cost)
  return jnp.zeros(cost.shape[0], jnp.int32).at[rows].set(
      cols.astype(jnp.int32))


def hungarian_match(outputs: Mapping[str, jax.Array],
                    targets: Mapping[str, jax.Array], cost_class: float = 1.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0
                    ) -> jax.Array:
  """Matches each image's targets to queries, as the release's matcher.

  No gradient flows through the matching.

  Args:
    outputs: `pred_logits (B, Q, K + 1)` and `pred_boxes (B, Q, 4)`.
    targets: `labels (B, T)` int, `boxes (B, T, 4)` `(cx, cy, w, h)` and
      `valid (B, T)` bool (False on padding), `T <= Q`.
    cost_class: weight of the class probability (the release's 1).
    cost_bbox: weight of the L1 box distance (5).
    cost_giou: weight of the GIoU (2).

  Returns:
    `(B, T)` int32: the query matched to each target (arbitrary but
    distinct for padded targets).

  Raises:
    ValueError: at trace time, naming the shapes, if they do not fit or if
      there are more targets than queries.
  """
  logits, boxes = outputs['pred_logits'], outputs['pred_boxes']
  labels, target_boxes, valid = (targets['labels'], targets['boxes'],
                                 targets['valid'])
  batch, queries = logits.shape[:2]
  if (logits.ndim != 3 or boxes.shape != (batch, queries, 4)
      or labels.ndim != 2 or labels.shape[0] != batch
      or target_boxes.shape != labels.shape + (4,)
      or valid.shape != labels.shape):
    raise ValueError(
        'outputs must hold pred_logits (B, Q, K + 1) and pred_boxes (B, Q, 4)'
        ', targets labels (B, T), boxes (B, T, 4) and valid (B, T); got '
        f'{logits.shape}, {boxes.shape}, {labels.shape}, '
        f'{target_boxes.shape}, {valid.shape}.')
  if labels.shape[1] > queries:
    raise ValueError(f'targets are padded to T={labels.shape[1]} but there '
                     f'are only Q={queries} queries; pad to T <= Q.')
  valid = valid.astype(bool)
  target_boxes = padded_target_boxes(target_boxes, valid)
  labels = jnp.where(valid, labels, 0)

  def one(l, b, lab, tb, v):
    cost = match_cost(l, b, lab, tb, cost_class, cost_bbox, cost_giou)
    return assign(cost, v)

  return jax.vmap(one)(jax.lax.stop_gradient(logits),
                       jax.lax.stop_gradient(boxes), labels, target_boxes,
                       valid)
