"""DETR's training and prediction steps, on the state every project keeps.

The state is `experiments.lib.train_state`'s (`step`, `params`,
`opt_state`, `rng`, `nonfinite_steps`) plus `batch_stats`, the frozen
batch norm of the backbone, so that `experiments.lib.checkpoints` saves and
verifies it unchanged. A `DetrRecipe` is the release's optimiser: AdamW,
the backbone at its own learning rate with its stem and `layer1` frozen,
gradient clipping, and a step decay of the learning rate.
"""

import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import optax

from experiments.lib import train_state
from irpe_jax.models import detr
from irpe_jax.models import detr_criterion
from irpe_jax.models import detr_postprocess

State = Dict[str, Any]
Batch = Dict[str, jax.Array]
TARGET_KEYS = ('labels', 'boxes', 'valid')


@dataclasses.dataclass(frozen=True)
class DetrRecipe:
  """The release's optimiser (`main.py` of DETR), hashable for jit caching.

  Attributes:
    lr: learning rate of the transformer and heads (1e-4).
    backbone_lr: learning rate of ResNet `layer2`-`layer4` (1e-5).
    weight_decay: AdamW's decoupled decay, on every parameter (1e-4).
    grad_clip_norm: clip the global gradient norm (0.1); 0 for none.
    lr_drop_step: multiply both rates by 0.1 from this step on (the
      release's `lr_drop` epoch, in steps).
    freeze_stem: freeze the ResNet stem and `layer1`, as the release does
      for its ImageNet backbone; a backbone trained from scratch (the
      offline demo) must train them.
    criterion: matching costs and loss weights.
  """
  lr: float = 1e-4
  backbone_lr: float = 1e-5
  weight_decay: float = 1e-4
  grad_clip_norm: float = 0.1
  lr_drop_step: int = 0
  freeze_stem: bool = True
  criterion: detr_criterion.CriterionConfig = (
      detr_criterion.CriterionConfig())

  def schedule(self, lr: float = None) -> optax.Schedule:
    lr = self.lr if lr is None else lr
    if self.lr_drop_step <= 0:
      return optax.constant_schedule(lr)
    return optax.piecewise_constant_schedule(lr, {self.lr_drop_step: 0.1})

  def optimizer(self) -> optax.GradientTransformation:
    """Clipping over the trained parameters, then AdamW per group.

    The frozen parameters get zero gradients from `train_step` (their
    gradient is stopped) and zero updates here (no weight decay either).
    """
    adamw = lambda lr: optax.adamw(self.schedule(lr), b1=0.9, b2=0.999,
                                   eps=1e-8, weight_decay=self.weight_decay)
    return optax.chain(
        (optax.clip_by_global_norm(self.grad_clip_norm)
         if self.grad_clip_norm else optax.identity()),
        optax.multi_transform({'frozen': optax.set_to_zero(),
                               'backbone': adamw(self.backbone_lr),
                               'transformer': adamw(self.lr)},
                              self.labels))

  def labels(self, params: Any) -> Any:
    """`detr.param_labels`, with no 'frozen' group unless `freeze_stem`."""
    labels = detr.param_labels(params)
    if self.freeze_stem:
      return labels
    return jax.tree.map(lambda l: 'backbone' if l == 'frozen' else l, labels)


def _freeze(params: Any, recipe: DetrRecipe) -> Any:
  # No backward pass through the stem and layer1 at all (not just a zeroed
  # update): XLA drops their weight gradients.
  return jax.tree.map(
      lambda label, p: jax.lax.stop_gradient(p) if label == 'frozen' else p,
      recipe.labels(params), params)


def train_step(state: State, batch: Batch, *, model: nn.Module,
               recipe: DetrRecipe) -> Tuple[State, Dict[str, jax.Array]]:
  """One step of the release's recipe on the set losses of every layer.

  As in `experiments.deit.steps.train_step` (`guarded_update`), a step whose
  loss or gradient norm is not finite is not applied: it only advances
  `step` and counts itself in `nonfinite_steps`.

  Args:
    state: the training state (module docstring).
    batch: `images (B, H, W, 3)`, `pixel_mask (B, H, W)`, `labels (B, T)`,
      `boxes (B, T, 4)`, `valid (B, T)` (see `experiments.detr.data`).
    model: a `DETR`.
    recipe: the optimiser.

  Returns:
    `(state, metrics)`: the release's named losses, `loss`, `grad_norm`,
    `lr` and `nonfinite_steps`.
  """
  tx = recipe.optimizer()
  key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                           state['step'])
  targets = {k: batch[k] for k in TARGET_KEYS}

  def loss_fn(params):
    outputs = model.apply(
        {'params': _freeze(params, recipe),
         'batch_stats': state['batch_stats']},
        batch['images'], batch['pixel_mask'], deterministic=False,
        rngs={'dropout': key})
    losses = detr_criterion.set_criterion(outputs, targets, recipe.criterion)
    losses.pop('matches')
    return losses['loss'], losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params'])
  params, opt_state, grad_norm, nonfinite_steps = train_state.guarded_update(
      state, loss, grads, tx)
  new_state = dict(state, step=state['step'] + 1, params=params,
                   opt_state=opt_state, nonfinite_steps=nonfinite_steps)
  metrics = dict(losses, grad_norm=grad_norm,
                 lr=recipe.schedule()(state['step']),
                 nonfinite_steps=nonfinite_steps)
  return new_state, metrics


def predict_step(variables: Any, batch: Batch, *, model: nn.Module
                 ) -> Dict[str, jax.Array]:
  """Detections of every query in pixels of the original images.

  Returns:
    `scores (B, Q)`, `labels (B, Q)`, `boxes (B, Q, 4)` (x0, y0, x1, y1),
    as the release's `PostProcess`.
  """
  outputs = model.apply(variables, batch['images'], batch['pixel_mask'])
  return detr_postprocess.post_process(outputs, batch['orig_size'])
