"""Initializers for iRPE lookup tables."""

import jax
import jax.numpy as jnp


def torch_xavier_uniform(gain: float = 1.0) -> jax.nn.initializers.Initializer:
  """PyTorch's `xavier_uniform_` on a table, as the DETR release initialises.

  PyTorch (`torch.nn.init._calculate_fan_in_and_fan_out`) takes
  `fan_in = shape[1] * prod(shape[2:])` and
  `fan_out = shape[0] * prod(shape[2:])`; for a `(Ht, D, nb)` table that is
  `fan_in = D * nb`, `fan_out = Ht * nb`, which differs from Flax's
  `xavier_uniform` (fans from the last two axes) on the same shape.

  Args:
    gain: scales the bound, as `xavier_uniform_`'s `gain`.

  Returns:
    An initializer `(key, shape, dtype) -> array`, uniform in
    `[-bound, bound]` with `bound = gain * sqrt(6 / (fan_in + fan_out))`.
  """

  def init(key, shape, dtype=jnp.float32):
    if len(shape) < 2:
      raise ValueError(f'xavier init needs a shape of rank >= 2, got {shape}.')
    receptive = 1
    for s in shape[2:]:
      receptive *= s
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = gain * (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
