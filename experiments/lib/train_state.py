"""The training state every experiment keeps, and its non-finite guard.

The training state is a plain dict (what the checkpoints hold):

  step             int32 scalar, updates taken (including refused ones);
  params           the model's parameters;
  opt_state        the optimiser's state;
  rng              uint32 key data; step `s` draws from `fold_in(rng, s)`;
  nonfinite_steps  int32 scalar, steps whose update was refused because
                   the loss or the gradient norm was not finite.

Both projects' steps update it through `guarded_update`, so that a NaN
never enters any state and every run counts refused steps alike; DETR adds
`batch_stats` (its frozen batch norm).
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

State = Dict[str, Any]


def init_state(params: Any, recipe: Any, rng: jax.Array) -> State:
  """The state before step 0.

  Args:
    params: the model's initial parameters.
    recipe: gives the optimiser whose state is initialised.
    rng: a PRNG key (typed) for the stochastic parts of every step.

  Returns:
    The state dict described in the module docstring.
  """
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt_state': recipe.optimizer().init(params),
          'rng': jax.random.key_data(rng),
          'nonfinite_steps': jnp.zeros((), jnp.int32)}


def guarded_update(state: State, loss: jax.Array, grads: Any,
                   tx: optax.GradientTransformation
                   ) -> Tuple[Any, Any, jax.Array, jax.Array]:
  """Applies `grads` with `tx` unless the loss or their norm is not finite.

  Shared by every training step here (DeiT's and DETR's), so that a NaN
  never enters any state and every run counts refused steps alike.

  Args:
    state: a training state (module docstring).
    loss: the step's scalar loss.
    grads: gradients of `loss` in the structure of `state['params']`.
    tx: the optimiser whose state is `state['opt_state']`.

  Returns:
    `(params, opt_state, grad_norm, nonfinite_steps)`: the new (or, for a
    refused step, the unchanged) parameters and optimiser state, the global
    gradient norm and the running count of refused steps.
  """
  grad_norm = optax.tree.norm(grads)
  # The gradient norm overflows to inf only for gradients beyond ~1e19,
  # which no healthy run meets: refusing those steps too is intended.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(operands):
    params, opt_state = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A conditional, as optax.apply_if_finite: on CPU an elementwise select
  # took no less time and one more params-sized buffer at its peak.
  params, opt_state = jax.lax.cond(finite, update, lambda operands: operands,
                                   (state['params'], state['opt_state']))
  nonfinite_steps = state['nonfinite_steps'] + (~finite).astype(jnp.int32)
  return params, opt_state, grad_norm, nonfinite_steps
