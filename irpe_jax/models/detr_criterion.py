"""DETR's set losses, as the release's `SetCriterion` (models/detr.py).

After matching (`detr_matcher.hungarian_match`), every decoder layer is
scored by

- `loss_ce`: cross-entropy of every query against its target's class, or
  no-object for unmatched queries, whose weight is `eos_coef` (0.1); a
  weighted mean over the batch's queries;
- `loss_bbox`: L1 of the matched boxes `(cx, cy, w, h)`, summed / num_boxes;
- `loss_giou`: 1 - GIoU of the matched boxes, summed / num_boxes;

and logged with `class_error` (100 - top-1 accuracy in percent of the
matched queries, final layer) and `cardinality_error` (mean absolute
difference between the number of queries not predicting no-object and the
number of targets; no gradient). Aux layers J = 0..L-2 carry a `_J` suffix.
The training loss is `ce_weight * loss_ce + bbox_weight * loss_bbox +
giou_weight * loss_giou` summed over all layers (the release's 1, 5, 2).

`num_boxes` is the number of targets of the whole global batch: under
`jax.jit` over a sharded batch that is the plain sum; inside `shard_map`
or `pmap` pass `axis_name` so that it is summed over devices, as the
release's all-reduce does.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from irpe_jax.models import detr_matcher
from irpe_jax.models import detr_postprocess


@dataclasses.dataclass(frozen=True)
class CriterionConfig:
  """Weights of the matching costs and of the losses (the release's).

  Attributes:
    cost_class: matching weight of the class probability.
    cost_bbox: matching weight of the L1 box distance.
    cost_giou: matching weight of the GIoU.
    eos_coef: weight of the no-object class in the cross-entropy.
    ce_weight: weight of `loss_ce` in the total.
    bbox_weight: weight of `loss_bbox`.
    giou_weight: weight of `loss_giou`.
  """
  cost_class: float = 1.0
  cost_bbox: float = 5.0
  cost_giou: float = 2.0
  eos_coef: float = 0.1
  ce_weight: float = 1.0
  bbox_weight: float = 5.0
  giou_weight: float = 2.0


def num_boxes(targets: Mapping[str, jax.Array],
              axis_name: Optional[str] = None) -> jax.Array:
  """Targets in the batch (summed over `axis_name`), at least 1, float32."""
  count = jnp.sum(targets['valid'].astype(jnp.float32))
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  return jnp.maximum(count, 1.0)


def layer_losses(outputs: Mapping[str, jax.Array],
                 targets: Mapping[str, jax.Array], match: jax.Array,
                 count: jax.Array, eos_coef: float = 0.1
                 ) -> Dict[str, jax.Array]:
  """The losses of one decoder layer for a given matching.

  Args:
    outputs: `pred_logits (B, Q, K + 1)`, `pred_boxes (B, Q, 4)`.
    targets: `labels (B, T)`, `boxes (B, T, 4)`, `valid (B, T)`.
    match: `(B, T)` the query of each target (`hungarian_match`).
    count: the number of boxes to normalise by (`num_boxes`).
    eos_coef: weight of the no-object class.

  Returns:
    `loss_ce`, `loss_bbox`, `loss_giou`, `class_error`, `cardinality_error`
    as float32 scalars.
  """
  logits = outputs['pred_logits'].astype(jnp.float32)
  boxes = outputs['pred_boxes'].astype(jnp.float32)
  batch, queries, classes = logits.shape
  no_object = classes - 1
  valid = targets['valid'].astype(bool)
  labels = jnp.where(valid, targets['labels'], no_object).astype(jnp.int32)
  target_boxes = detr_matcher.padded_target_boxes(
      targets['boxes'].astype(jnp.float32), valid)
  rows = jnp.arange(batch)[:, None]
  # Padded targets scatter nowhere (index Q is dropped).
  scatter_to = jnp.where(valid, match, queries)
  query_labels = jnp.full((batch, queries), no_object, jnp.int32).at[
      rows, scatter_to].set(labels, mode='drop')
  weight = jnp.where(query_labels == no_object, eos_coef, 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, query_labels)
  loss_ce = jnp.sum(weight * ce) / jnp.sum(weight)

  matched_logits = logits[rows, match]                       # (B, T, K + 1)
  matched_boxes = boxes[rows, match]                         # (B, T, 4)
  valid_f = valid.astype(jnp.float32)
  correct = (jnp.argmax(matched_logits, -1) == labels) * valid_f
  # The release's `accuracy` of no matched query is 0, so the error 100.
  accuracy = 100.0 * jnp.sum(correct) / jnp.maximum(jnp.sum(valid_f), 1.0)

  l1 = jnp.abs(matched_boxes - target_boxes).sum(-1)
  giou = jax.vmap(jax.vmap(
      lambda a, b: detr_matcher.generalized_box_iou(a[None], b[None])[0, 0]))(
          detr_postprocess.box_cxcywh_to_xyxy(matched_boxes),
          detr_postprocess.box_cxcywh_to_xyxy(target_boxes))
  cardinality = jnp.sum(jnp.argmax(logits, -1) != no_object, axis=1)
  return {
      'loss_ce': loss_ce,
      'loss_bbox': jnp.sum(l1 * valid_f) / count,
      'loss_giou': jnp.sum((1.0 - giou) * valid_f) / count,
      'class_error': jax.lax.stop_gradient(100.0 - accuracy),
      'cardinality_error': jax.lax.stop_gradient(jnp.mean(jnp.abs(
          cardinality - jnp.sum(valid_f, axis=1)).astype(jnp.float32))),
  }


def set_criterion(outputs: Mapping[str, Any],
                  targets: Mapping[str, jax.Array],
                  config: CriterionConfig = CriterionConfig(),
                  axis_name: Optional[str] = None) -> Dict[str, jax.Array]:
  """Matches and scores every decoder layer, as the release's `SetCriterion`.

  Args:
    outputs: DETR's outputs: `pred_logits (B, Q, K + 1)`, `pred_boxes
      (B, Q, 4)` and optionally `aux_outputs`, a list of such dicts.
    targets: `labels (B, T)` int in `[0, K)`, `boxes (B, T, 4)` `(cx, cy,
      w, h)` relative to the unpadded image, `valid (B, T)` bool.
    config: the matching costs and loss weights.
    axis_name: mapped axis to sum the box count over, or None.

  Returns:
    The release's named losses (`loss_ce`, ..., with `_J` for aux layer J;
    `class_error` for the final layer only, as the release logs it), plus
    `loss`, the weighted total, and `matches (B, T)` of the final layer.
  """
  count = num_boxes(targets, axis_name)
  layers = [('', outputs)] + [(f'_{j}', aux) for j, aux in
                              enumerate(outputs.get('aux_outputs', ()))]
  result, total = {}, 0.0
  for suffix, out in layers:
    match = detr_matcher.hungarian_match(
        out, targets, config.cost_class, config.cost_bbox, config.cost_giou)
    losses = layer_losses(out, targets, match, count, config.eos_coef)
    if suffix:
      del losses['class_error']
    else:
      result['matches'] = match
    total += (config.ce_weight * losses['loss_ce']
              + config.bbox_weight * losses['loss_bbox']
              + config.giou_weight * losses['loss_giou'])
    result.update({name + suffix: v for name, v in losses.items()})
  result['loss'] = total
  return result
