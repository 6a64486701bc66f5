"""DeiT's training and evaluation steps: one of each, for every DeiT run.

`experiments.deit.trainer` jits them over a device mesh,
`experiments.deit.demo` vmaps them over seeds and
`experiments.benchmarks.bench_train` times them; the loss and the update are
the same everywhere. A `Recipe` carries what differs between
them (schedule, augmentation on the device, label smoothing); it is frozen
and hashable, so a step closed over a model and a recipe compiles once per
process however many runs use it.

The training state is `experiments.lib.train_state`'s, shared with DETR.
"""

import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from experiments.deit import input_pipeline
from experiments.deit import optim
from experiments.lib import train_state

State = Dict[str, Any]
Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The hyper-parameters of a training step, besides the model.

  Attributes:
    peak_lr: learning rate at the end of the warm-up.
    total_steps: length of the cosine schedule.
    warmup_steps: linear warm-up from `warmup_lr` to `peak_lr`.
    warmup_lr: learning rate at step 0.
    min_lr: learning rate at the end of the cosine.
    weight_decay: AdamW's decoupled decay (masked as in DeiT).
    grad_clip_norm: clip the global gradient norm; 0 for none.
    label_smoothing: timm's smoothing of the one-hot targets.
    mixup_alpha: Beta parameter of mixup; 0 disables it.
    cutmix_alpha: Beta parameter of cutmix; 0 disables it.
    mixup_switch_prob: probability of cutmix when both are on.
  """
  peak_lr: float
  total_steps: int
  warmup_steps: int
  warmup_lr: float
  min_lr: float
  weight_decay: float
  grad_clip_norm: float = 0.0
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mixup_switch_prob: float = 0.5

  def schedule(self) -> optax.Schedule:
    return optim.make_schedule(self.peak_lr, self.total_steps,
                               self.warmup_steps, self.min_lr, self.warmup_lr)

  def optimizer(self) -> optax.GradientTransformation:
    return optim.make_optimizer(self.schedule(), self.weight_decay,
                                self.grad_clip_norm)


init_state = train_state.init_state


def train_step(state: State, batch: Batch, *, model: nn.Module,
               recipe: Recipe) -> Tuple[State, Metrics]:
  """One AdamW step on the label-smoothed, mixed-up cross-entropy.

  A step whose loss or gradient norm is not finite changes neither the
  parameters nor the optimiser state: it only advances `step` and counts
  itself in `nonfinite_steps`. Whether the run then stops or goes on is the
  caller's choice (`nonfinite_policy` in the training config); either way a
  NaN never enters the state.

  Args:
    state: the training state (module docstring).
    batch: `{'image': (B, H, W, C) float, 'label': (B,) int}`.
    model: a classifier; called as `model.apply(v, x, train=...)`. A
      distilled model's two heads are averaged (no teacher here).
    recipe: hyper-parameters.

  Returns:
    `(state, metrics)`, metrics of this step: `loss`, `grad_norm`, `lr`
    and the running `nonfinite_steps`.
  """
  tx = recipe.optimizer()
  key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                           state['step'])
  mix_key, drop_key = jax.random.split(key)
  targets = input_pipeline.smooth_one_hot(batch['label'], model.num_classes,
                                          recipe.label_smoothing)
  images, targets = input_pipeline.mixup_cutmix(
      mix_key, batch['image'], targets, recipe.mixup_alpha,
      recipe.cutmix_alpha, recipe.mixup_switch_prob)

  def loss_fn(params):
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': drop_key})
    if isinstance(logits, tuple):
      logits = (logits[0] + logits[1]) / 2
    return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                       targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state['params'])
  params, opt_state, grad_norm, nonfinite_steps = train_state.guarded_update(
      state, loss, grads, tx)
  new_state = {'step': state['step'] + 1, 'params': params,
               'opt_state': opt_state, 'rng': state['rng'],
               'nonfinite_steps': nonfinite_steps}
  metrics = {'loss': loss, 'grad_norm': grad_norm,
             'lr': recipe.schedule()(state['step']),
             'nonfinite_steps': nonfinite_steps}
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> Metrics:
  """Sums of the eval metrics over the unmasked examples of a batch.

  Args:
    params: the model's parameters.
    batch: `{'image': (B, H, W, C), 'label': (B,) int, 'mask': (B,)}`; mask
      0 marks padding.
    model: as in `train_step`.

  Returns:
    `{'loss', 'top1', 'top5', 'count'}`, each a sum over the batch: divide
    by `count` for means.
  """
  logits = model.apply({'params': params}, batch['image'], train=False)
  labels, mask = batch['label'], batch['mask']
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  top5 = jax.lax.top_k(logits, min(5, model.num_classes))[1]
  return {'loss': jnp.sum(loss * mask),
          'top1': jnp.sum((top5[:, 0] == labels) * mask),
          'top5': jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
          'count': jnp.sum(mask)}
