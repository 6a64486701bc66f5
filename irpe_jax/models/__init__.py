"""DeiT and DETR models with iRPE, their registry, params and NNX bridge.

    >>> from irpe_jax import models
    >>> name = 'deit_tiny_patch16_224_ctx_product_50_shared_k'
    >>> model = models.create_model(name)
    >>> models.list_models('*_shared_qkv')
    >>> detr = models.DETR(enc_rpe2d='rpe-2.0-product-ctx-1-k')
"""

from irpe_jax.models.detr import DETR
from irpe_jax.models.detr_criterion import set_criterion
from irpe_jax.models.detr_matcher import hungarian_match
from irpe_jax.models.detr_postprocess import post_process
from irpe_jax.models.nnx_bridge import to_nnx
from irpe_jax.models.params import check_params
from irpe_jax.models.params import expected_params
from irpe_jax.models.params import expected_variables
from irpe_jax.models.registry import create_model
from irpe_jax.models.registry import list_models
from irpe_jax.models.registry import model_kwargs
from irpe_jax.models.registry import PRETRAINED
from irpe_jax.models.registry import RELEASED
from irpe_jax.models.vit import resample_posemb
from irpe_jax.models.vit import VisionTransformer

__all__ = (
    'check_params',
    'create_model',
    'DETR',
    'expected_params',
    'expected_variables',
    'hungarian_match',
    'list_models',
    'model_kwargs',
    'post_process',
    'PRETRAINED',
    'RELEASED',
    'resample_posemb',
    'set_criterion',
    'to_nnx',
    'VisionTransformer',
)
