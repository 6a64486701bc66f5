"""The DeiT-iRPE model as an NNX module, through Flax's Linen-to-NNX bridge.

The model is defined once, in Linen (`VisionTransformer`); `to_nnx` wraps it
with `flax.nnx.bridge.ToNNX`. The NNX module holds the same parameters
under the same names, so params converted from a release checkpoint (or
trained in Linen) load as they are:

    >>> name = 'deit_tiny_patch16_224_ctx_product_50_shared_k'
    >>> model = models.create_model(name)
    >>> params = irpe_jax.convert.load_torch_checkpoint('ckpt.pth', model)
    >>> nnx_model = models.to_nnx(model, params)
    >>> logits = nnx_model(images)                       # eval
    >>> logits = nnx_model(images, train=True)           # dropout from rngs
    >>> nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))  # the params again

Attention weights are available as with Linen: call with
`mutable=['intermediates']`.

A DETR goes the same way, with its variables (the frozen batch norm becomes
`nnx.BatchStat`): `models.to_nnx(detr_model, variables)(images, pixel_mask)`.
"""

from typing import Any, Optional, Union

from flax import nnx
import jax
import jax.numpy as jnp

from irpe_jax.models import detr
from irpe_jax.models import params as params_lib
from irpe_jax.models import vit

# Linen collections and the NNX variable types the bridge makes of them.
_VARIABLE_TYPES = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def to_nnx(model: Union[vit.VisionTransformer, detr.DETR],
           params: Optional[Any] = None, *,
           rngs: Optional[nnx.Rngs] = None) -> nnx.bridge.ToNNX:
  """Wraps a Linen `VisionTransformer` or `DETR` as an initialised NNX module.

  Args:
    model: the Linen model (from `create_model` or built directly).
    params: the Linen `params` tree to load (for a DETR its variables,
      `{'params': ..., 'batch_stats': ...}`); freshly initialised from
      `rngs` when None.
    rngs: `nnx.Rngs` with 'params' and 'dropout' streams; default
      `nnx.Rngs(params=0, dropout=1)`.

  Returns:
    An `nnx.bridge.ToNNX` module: call it as the Linen model's `apply`,
    `module(images, train=False)` or `module(images, pixel_mask)`.

  Raises:
    ValueError: listing missing, unexpected and wrongly shaped params, if
      `params` does not fit the model.
  """
  if not isinstance(model, (vit.VisionTransformer, detr.DETR)):
    raise TypeError(f'model must be a VisionTransformer or a DETR, got '
                    f'{type(model).__name__}.')
  rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)
  inputs = [jnp.zeros(x.shape, x.dtype)
            for x in params_lib.example_inputs(model)]
  if params is None:
    return nnx.bridge.ToNNX(model, rngs=rngs).lazy_init(*inputs)
  # Given params, only the structure is built (no real init) and filled.
  module = nnx.eval_shape(
      lambda: nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0)).lazy_init(*inputs))
  module.to_nnx__rngs = rngs.fork()
  states = {c: nnx.state(module, t) for c, t in _VARIABLE_TYPES.items()}
  expected = {c: nnx.to_pure_dict(s) for c, s in states.items()
              if jax.tree.leaves(s)}
  # Checked whole first (replace_by_pure_dict would leave a missing param
  # abstract): raises listing every mismatch.
  if set(expected) == {'params'}:
    variables = {'params': params_lib.check_params(params, expected['params'])}
  else:
    variables = params_lib.check_params(params, expected)
  for collection, values in variables.items():
    nnx.replace_by_pure_dict(states[collection],
                             jax.tree.map(jnp.asarray, values))
    nnx.update(module, states[collection])
  return module
