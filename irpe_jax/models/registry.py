"""Named DeiT-iRPE models: the release's, and the paper's ablations.

Names follow the release:

    deit_{SIZE}[_distilled]_patch16_224[_{MODE}_{METHOD}_{N}_{HEADS}_{ON}][_noabs]

- `SIZE`: `tiny` (192 features, 3 heads), `small` (384, 6), `base` (768, 12)
  (`vit.SIZES`); all have 12 blocks, 16x16 patches, 224px images and 1000
  classes (`VisionTransformer`'s defaults).
- `MODE`: `ctx` (contextual) or `bias`; `METHOD`: `euc`, `quant`, `cross` or
  `product`, with the release's ratios (`irpe_jax.config.METHOD_RATIOS`:
  euc 20, quant 33, cross 20, product 1.9); `HEADS`: `shared` (one table for
  all heads, as released) or
  `unshared`; `ON`: where iRPE goes, a combination of `q`, `k`, `v`.
- `N` is the release's bucket tag: the number of buckets that a 14x14 grid
  with a class token actually uses (the two tables summed for cross). It is
  not always the table size: `ctx_euc_20` has 82-bucket tables, of which a
  14x14 grid reaches 20. `product_50` is the paper's 7x7 + 1 buckets.
- `_noabs`: no learnable absolute position embedding (paper Table 4).
  `deit_small_patch16_224_noabs` has no position encoding at all.

Registered:

- plain DeiT: `deit_{tiny,small,base}_patch16_224` and the distilled
  `deit_{tiny,small,base}_distilled_patch16_224`;
- the nine models the release registers (`RELEASED`), among them the six
  with published checkpoints (`PRETRAINED`);
- ablations on DeiT-S, as in the paper: every mode x method on k; contextual
  product on every combination of q, k, v and bias product on q, k, qk;
  bias and contextual product on k with shared and unshared heads, with and
  without the absolute embedding (Table 4).
"""

import dataclasses
import fnmatch
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from irpe_jax import buckets
from irpe_jax import config as config_lib
from irpe_jax.models import vit

# The six checkpoints of the release, and its nine registered models.
PRETRAINED = tuple(
    f'deit_{size}_patch16_224_ctx_product_50_shared_{on}'
    for size, on in (('tiny', 'k'), ('small', 'k'), ('small', 'qk'),
                     ('small', 'qkv'), ('base', 'k'), ('base', 'qkv')))
RELEASED = PRETRAINED + tuple(
    f'deit_small_patch16_224_ctx_{m}_shared_k'
    for m in ('euc_20', 'quant_51', 'cross_56'))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a registered name builds.

  Attributes:
    size: 'tiny', 'small' or 'base'.
    rpe: keyword arguments of `irpe_jax.get_rpe_config`, or None.
    distilled: DeiT-D with a distillation token.
    use_abs_pos_embed: keep the absolute position embedding.
  """
  size: str
  rpe: Optional[Tuple[Tuple[str, Any], ...]] = None
  distilled: bool = False
  use_abs_pos_embed: bool = True

  def kwargs(self) -> Dict[str, Any]:
    """The `VisionTransformer` arguments of this spec."""
    rpe = None if self.rpe is None else config_lib.get_rpe_config(
        **dict(self.rpe))
    # The other fields keep VisionTransformer's defaults: DeiT at 224px.
    return dict(rpe_config=rpe, distilled=self.distilled,
                use_abs_pos_embed=self.use_abs_pos_embed,
                **vit.SIZES[self.size])


def bucket_tag(method: str, ratio: float) -> int:
  """The `N` of a name: buckets used on a 14x14 grid with a class token."""
  halves = ((buckets.CROSS_ROWS, buckets.CROSS_COLS) if method == 'cross'
            else (method,))
  alpha, beta, gamma = config_lib.piecewise_params(ratio)
  return sum(
      len(np.unique(buckets.get_bucket_ids_2d(
          half, 14, 14, 1, alpha, beta, gamma)[0]))
      for half in halves)


def _rpe_name(mode: str, method: str, shared: bool, on: str) -> str:
  heads = 'shared' if shared else 'unshared'
  ratio = config_lib.METHOD_RATIOS[method]
  return (f'{mode}_{method}_{bucket_tag(method, ratio)}_'
          f'{heads}_{on}')


def _build_registry() -> Dict[str, ModelSpec]:
  registry = {}
  for size in vit.SIZES:
    registry[f'deit_{size}_patch16_224'] = ModelSpec(size)
    registry[f'deit_{size}_distilled_patch16_224'] = ModelSpec(
        size, distilled=True)
  registry['deit_small_patch16_224_noabs'] = ModelSpec(
      'small', use_abs_pos_embed=False)

  def add(size, mode, method, on, shared=True, abs_pos=True):
    name = (f'deit_{size}_patch16_224_{_rpe_name(mode, method, shared, on)}'
            + ('' if abs_pos else '_noabs'))
    rpe = (('ratio', config_lib.METHOD_RATIOS[method]), ('method', method),
           ('mode', mode), ('shared_head', shared), ('skip', 1),
           ('rpe_on', on))
    registry[name] = ModelSpec(size, rpe, use_abs_pos_embed=abs_pos)

  # The release's nine (checked against RELEASED below).
  for size, on in (('tiny', 'k'), ('small', 'k'), ('small', 'qk'),
                   ('small', 'qkv'), ('base', 'k'), ('base', 'qkv')):
    add(size, 'ctx', 'product', on)
  for method in ('euc', 'quant', 'cross'):
    add('small', 'ctx', method, 'k')
  # The paper's ablations on DeiT-S: mode x method on keys ...
  for mode in ('bias', 'ctx'):
    for method in config_lib.METHOD_RATIOS:
      add('small', mode, method, 'k')
  # ... where to put iRPE ...
  for on in ('q', 'k', 'v', 'qk', 'qv', 'kv', 'qkv'):
    add('small', 'ctx', 'product', on)
  for on in ('q', 'k', 'qk'):
    add('small', 'bias', 'product', on)
  # ... and shared heads, with and without the absolute embedding (Table 4).
  for mode in ('bias', 'ctx'):
    for shared in (True, False):
      for abs_pos in (True, False):
        add('small', mode, 'product', 'k', shared, abs_pos)
  return registry


_REGISTRY = _build_registry()
assert set(RELEASED) <= set(_REGISTRY), 'a released name is not generated'


def list_models(pattern: str = '*') -> List[str]:
  """Sorted registered names matching a shell-style `pattern`."""
  return sorted(fnmatch.filter(_REGISTRY, pattern))


def model_kwargs(name: str) -> Dict[str, Any]:
  """The `VisionTransformer` arguments of a registered name."""
  if name not in _REGISTRY:
    close = [n for n in _REGISTRY if n.startswith(name.split('_patch')[0])]
    raise ValueError(f'Unknown model {name!r}; see list_models(). '
                     f'Similar: {close[:8]}.')
  return _REGISTRY[name].kwargs()


def create_model(name: str, **overrides: Any) -> vit.VisionTransformer:
  """Builds a registered model.

  Args:
    name: a name from `list_models()`.
    **overrides: `VisionTransformer` fields to change, for example
      `num_classes=10, drop_path_rate=0.1, dtype=jnp.bfloat16, remat=True`.

  Returns:
    An unbound `VisionTransformer`.
  """
  kwargs = model_kwargs(name)
  fields = {f.name for f in dataclasses.fields(vit.VisionTransformer)}
  unknown = sorted(set(overrides) - fields - {'parent', 'name'})
  if unknown:
    raise TypeError(f'Unknown VisionTransformer fields {unknown} for '
                    f'{name!r}.')
  kwargs.update(overrides)
  return vit.VisionTransformer(**kwargs)
