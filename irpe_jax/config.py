"""iRPE configurations: which encodings go on q, k and v, and their buckets.

Mirrors `get_rpe_config` / `get_single_rpe_config` of the release, with frozen
(hashable) dataclasses instead of mutable dicts so that configs can be fields
of Flax modules and keys of caches.
"""

import dataclasses
from typing import Optional, Union

from irpe_jax import buckets

MODES = ('bias', 'contextual')
_MODE_ALIASES = {'bias': 'bias', 'contextual': 'contextual', 'ctx': 'contextual'}
# The release's integer METHOD ids, accepted for compatibility.
_METHOD_IDS = {0: buckets.EUCLIDEAN, 1: buckets.QUANT, 3: buckets.PRODUCT,
               4: buckets.CROSS, 41: buckets.CROSS_ROWS, 42: buckets.CROSS_COLS}


def canonical_mode(mode: str) -> str:
  """Maps 'bias', 'contextual' or the alias 'ctx' to its canonical name."""
  name = _MODE_ALIASES.get(mode) if isinstance(mode, str) else None
  if name is None:
    raise ValueError(f'Unknown mode {mode!r}; expected one of '
                     f'{sorted(_MODE_ALIASES)}.')
  return name


def canonical_method(method: Union[str, int]) -> str:
  """Maps a method name, alias or release METHOD id to its canonical name."""
  if isinstance(method, int) and not isinstance(method, bool):
    if method not in _METHOD_IDS:
      raise ValueError(f'Unknown method id {method}; expected one of '
                       f'{sorted(_METHOD_IDS)}.')
    return _METHOD_IDS[method]
  return buckets.canonical_method(method)


@dataclasses.dataclass(frozen=True)
class SingleRPEConfig:
  """The iRPE of one of q, k or v.

  Attributes:
    shared_head: whether all heads share one table (`Ht = 1`).
    mode: 'bias' or 'contextual'.
    method: 'euc', 'quant', 'cross' or 'product'.
    alpha: piecewise index parameter, `ratio`.
    beta: piecewise index parameter, `2 * ratio`.
    gamma: piecewise index parameter, `8 * ratio`.
    num_buckets: buckets per table, including the skip bucket if `skip > 0`.
    skip: number of leading non-spatial tokens the model was built for.
    index_fn: 'piecewise' (the paper's g) or 'clip' (paper Table 3).
  """
  shared_head: bool
  mode: str
  method: str
  alpha: float
  beta: float
  gamma: float
  num_buckets: int
  skip: int
  index_fn: str = 'piecewise'


@dataclasses.dataclass(frozen=True)
class RPEConfig:
  """Per-target configs; `None` where that target has no iRPE."""
  rpe_q: Optional[SingleRPEConfig] = None
  rpe_k: Optional[SingleRPEConfig] = None
  rpe_v: Optional[SingleRPEConfig] = None


def get_single_rpe_config(ratio: float = 1.9,
                          method: Union[str, int] = 'product',
                          mode: str = 'contextual',
                          shared_head: bool = True,
                          skip: int = 0,
                          index_fn: str = 'piecewise') -> SingleRPEConfig:
  """The config of one iRPE, as `get_single_rpe_config` of the release.

  Args:
    ratio: sets `alpha = ratio, beta = 2 ratio, gamma = 8 ratio`; > 0.
    method: 'euc' | 'euclidean', 'quant' | 'quantization', 'cross' or
      'product'.
    mode: 'bias', 'contextual' or 'ctx'.
    shared_head: share one table across heads.
    skip: number of leading non-spatial tokens (>= 0); any `skip > 0` adds one
      bucket.
    index_fn: 'piecewise' or 'clip'.

  Returns:
    A frozen `SingleRPEConfig`.
  """
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
    raise TypeError(f'ratio must be a number, got {ratio!r}.')
  if not ratio > 0:
    raise ValueError(f'ratio must be > 0, got {ratio}.')
  if isinstance(skip, bool) or not isinstance(skip, int):
    raise TypeError(f'skip must be an int, got {skip!r}.')
  if skip < 0:
    raise ValueError(f'skip must be >= 0, got {skip}.')
  if index_fn not in ('piecewise', 'clip'):
    raise ValueError(f"index_fn must be 'piecewise' or 'clip', got "
                     f'{index_fn!r}.')
  method = canonical_method(method)
  if method in (buckets.CROSS_ROWS, buckets.CROSS_COLS):
    raise ValueError(f"method {method!r} is half of 'cross'; configure "
                     "method='cross' instead.")
  alpha, beta, gamma = 1.0 * ratio, 2.0 * ratio, 8.0 * ratio
  num_buckets = buckets.num_buckets_without_skip(
      buckets.CROSS_ROWS if method == buckets.CROSS else method, beta)
  return SingleRPEConfig(
      shared_head=bool(shared_head), mode=canonical_mode(mode), method=method,
      alpha=alpha, beta=beta, gamma=gamma,
      num_buckets=num_buckets + (1 if skip > 0 else 0), skip=skip,
      index_fn=index_fn)


def get_rpe_config(ratio: float = 1.9,
                   method: Union[str, int] = 'product',
                   mode: str = 'contextual',
                   shared_head: bool = True,
                   skip: int = 0,
                   rpe_on: str = 'k',
                   index_fn: str = 'piecewise') -> RPEConfig:
  """The iRPE config of an attention layer, as `get_rpe_config` of the release.

  Args:
    ratio: see `get_single_rpe_config`.
    method: see `get_single_rpe_config`.
    mode: see `get_single_rpe_config`; 'bias' cannot go on v.
    shared_head: see `get_single_rpe_config`.
    skip: see `get_single_rpe_config`.
    rpe_on: where to put iRPE: any non-empty combination of 'q', 'k', 'v'.
    index_fn: see `get_single_rpe_config`.

  Returns:
    A frozen `RPEConfig` with `rpe_q`, `rpe_k`, `rpe_v`.
  """
  if not isinstance(rpe_on, str) or not rpe_on or set(rpe_on) - set('qkv'):
    raise ValueError(f"rpe_on must be a non-empty combination of 'q', 'k' "
                     f"and 'v', got {rpe_on!r}.")
  single = get_single_rpe_config(ratio=ratio, method=method, mode=mode,
                                 shared_head=shared_head, skip=skip,
                                 index_fn=index_fn)
  if 'v' in rpe_on and single.mode == 'bias':
    raise ValueError(f"mode='bias' does not exist on v (rpe_on={rpe_on!r}); "
                     "use mode='contextual' or drop 'v'.")
  return RPEConfig(*(single if t in rpe_on else None for t in 'qkv'))


def parse_rpe_string(spec: str) -> RPEConfig:
  """Parses the DETR release's `rpe-RATIO-METHOD-MODE-SHARED-ON` with skip 0.

  For example 'rpe-2.0-product-ctx-1-k'.
  """
  parts = spec.split('-') if isinstance(spec, str) else []
  if len(parts) != 6 or parts[0] != 'rpe':
    raise ValueError(f"spec must look like 'rpe-RATIO-METHOD-MODE-SHARED-ON', "
                     f'got {spec!r}.')
  try:
    ratio = float(parts[1])
  except ValueError:
    raise ValueError(f'RATIO in {spec!r} must be a number.') from None
  if parts[4] not in ('0', '1'):
    raise ValueError(f"SHARED in {spec!r} must be '0' or '1'.")
  return get_rpe_config(ratio=ratio, method=parts[2], mode=parts[3],
                        shared_head=parts[4] == '1', skip=0, rpe_on=parts[5])
