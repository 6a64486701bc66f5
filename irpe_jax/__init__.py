"""irpe_jax: image relative position encoding (iRPE) for JAX and Flax.

A JAX/Flax implementation of "Rethinking and Improving Relative Position
Encoding for Vision Transformer" (Wu et al., ICCV 2021), bit-exact with the
original PyTorch release. The Linen modules are exported here; their NNX
peers are in `irpe_jax.nnx`.

Layers, each importing only those before it: `buckets` (bucket ids, numpy)
-> `ops` (lookups on arrays), `blockwise` (flash attention with the iRPE
terms in its blocks) -> `kernels` (the same, as Pallas kernels) -> `config`,
`core`, `tables`, `attention` (framework-free) -> `linen` | `nnx` ->
`models` -> `convert`.
"""

from irpe_jax.attention import ATTENTION_IMPLS
from irpe_jax.attention import attention_with_rpe
from irpe_jax.attention import resolve_attention_impl
from irpe_jax.blockwise import blockwise_attention
from irpe_jax.blockwise import LogitTerm
from irpe_jax.buckets import BucketGeometry
from irpe_jax.buckets import clip_index
from irpe_jax.buckets import get_bucket_geometry
from irpe_jax.buckets import get_bucket_ids_2d
from irpe_jax.buckets import piecewise_index
from irpe_jax.config import get_rpe_config
from irpe_jax.config import get_single_rpe_config
from irpe_jax.config import parse_rpe_string
from irpe_jax.config import RPEConfig
from irpe_jax.config import SingleRPEConfig
from irpe_jax.core import rpe_lookup
from irpe_jax.initializers import torch_xavier_uniform
from irpe_jax.kernels import pallas_attention
from irpe_jax.linen import build_rpe
from irpe_jax.linen import IRPE
from irpe_jax.linen import IRPEAttention
from irpe_jax.linen import IRPECross
from irpe_jax.ops import bucket_gather
from irpe_jax.ops import bucket_scatter
from irpe_jax.ops import IMPLS

__version__ = '0.1.0'

__all__ = (
    'ATTENTION_IMPLS',
    'attention_with_rpe',
    'blockwise_attention',
    'BucketGeometry',
    'bucket_gather',
    'bucket_scatter',
    'build_rpe',
    'clip_index',
    'get_bucket_geometry',
    'get_bucket_ids_2d',
    'get_rpe_config',
    'get_single_rpe_config',
    'IMPLS',
    'IRPE',
    'IRPEAttention',
    'IRPECross',
    'LogitTerm',
    'pallas_attention',
    'parse_rpe_string',
    'piecewise_index',
    'resolve_attention_impl',
    'RPEConfig',
    'rpe_lookup',
    'SingleRPEConfig',
    'torch_xavier_uniform',
)
