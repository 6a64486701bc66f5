"""The DeiT optimiser: AdamW, linear lr scaling, warm-up + cosine, wd mask.

Shared by `experiments.deit.train` and `experiments.deit.demo`.
"""

from typing import Any, Optional

import flax
import jax
import optax

# Parameters the paper (and DeiT) exclude from weight decay, besides every
# bias and normalisation scale (all parameters of rank <= 1).
NO_DECAY_NAMES = ('cls_token', 'dist_token', 'pos_embed',
                  'lookup_table_weight', 'lookup_table_bias')


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices other than tokens and tables.

  Args:
    params: a pytree of parameters (nested dicts, as Flax gives).

  Returns:
    A pytree of bools of the same structure.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  mask = {path: (value.ndim > 1 and path[-1] not in NO_DECAY_NAMES)
          for path, value in flat.items()}
  return flax.traverse_util.unflatten_dict(mask)


def scaled_learning_rate(base_lr: float, batch_size: int,
                         reference_batch: int = 512) -> float:
  """DeiT's linear scaling rule, `lr = base_lr * batch_size / 512`."""
  return base_lr * batch_size / reference_batch


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int,
                  min_lr: float = 1e-5,
                  warmup_init_lr: float = 1e-6) -> optax.Schedule:
  """Linear warm-up to `peak_lr`, then cosine decay to `min_lr`."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=min(warmup_init_lr, peak_lr), peak_value=peak_lr,
      warmup_steps=warmup_steps, decay_steps=max(total_steps, 1),
      end_value=min(min_lr, peak_lr))


def make_optimizer(schedule: optax.Schedule, weight_decay: float,
                   grad_clip_norm: Optional[float] = None,
                   b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW with decay masked off tokens, tables, biases and norms.

  Args:
    schedule: learning rate per step.
    weight_decay: decoupled weight decay (0.05 in DeiT).
    grad_clip_norm: clip the global gradient norm to this value; None or 0
      to disable.
    b1: Adam beta 1.
    b2: Adam beta 2.
    eps: Adam epsilon.

  Returns:
    An optax transformation.
  """
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, mask=decay_mask)
  if grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
  return adamw


def learning_rate_at(schedule: optax.Schedule, step: int) -> float:
  """The schedule's value at `step`, as a Python float (for logging)."""
  return float(jax.device_get(schedule(step)))
