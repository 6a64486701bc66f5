"""The DeiT-iRPE model as an NNX module, through Flax's Linen-to-NNX bridge.

The model is defined once, in Linen (`VisionTransformer`); `to_nnx` wraps it
with `flax.nnx.bridge.ToNNX`. The NNX module holds the same parameters
under the same names, so params converted from a release checkpoint (or
trained in Linen) load as they are:

    >>> model = models.create_model('deit_tiny_patch16_224_ctx_product_50_shared_k')
    >>> params = irpe_jax.convert.load_torch_checkpoint('ckpt.pth', model)
    >>> nnx_model = models.to_nnx(model, params)
    >>> logits = nnx_model(images)                       # eval
    >>> logits = nnx_model(images, train=True)           # dropout from rngs
    >>> nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))  # the params again

Attention weights are available as with Linen: call with
`mutable=['intermediates']`.
"""

from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from irpe_jax.models import params as params_lib
from irpe_jax.models import vit


def to_nnx(model: vit.VisionTransformer, params: Optional[Any] = None, *,
           rngs: Optional[nnx.Rngs] = None) -> nnx.bridge.ToNNX:
  """Wraps a Linen `VisionTransformer` as an initialised NNX module.

  Args:
    model: the Linen model (from `create_model` or built directly).
    params: the Linen `params` tree to load; freshly initialised from
      `rngs` when None.
    rngs: `nnx.Rngs` with 'params' and 'dropout' streams; default
      `nnx.Rngs(params=0, dropout=1)`.

  Returns:
    An `nnx.bridge.ToNNX` module: call it as `module(images, train=False)`.

  Raises:
    ValueError: listing missing, unexpected and wrongly shaped params, if
      `params` does not fit the model.
  """
  if not isinstance(model, vit.VisionTransformer):
    raise TypeError(f'model must be a VisionTransformer, got '
                    f'{type(model).__name__}.')
  rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)
  size = model.img_size
  rows, cols = (size, size) if isinstance(size, int) else size
  images = jnp.zeros((1, rows, cols, model.in_chans), jnp.float32)
  if params is None:
    return nnx.bridge.ToNNX(model, rngs=rngs).lazy_init(images)
  # Given params, only the structure is built (no real init) and filled.
  module = nnx.eval_shape(
      lambda: nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0)).lazy_init(images))
  module.to_nnx__rngs = rngs.fork()
  state = nnx.state(module, nnx.Param)
  # Checked whole first (replace_by_pure_dict would leave a missing param
  # abstract): raises listing every mismatch.
  params = params_lib.check_params(params, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(module, state)
  return module
