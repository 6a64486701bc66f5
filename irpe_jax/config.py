"""iRPE configurations: which encodings go on q, k and v, and their buckets.

Mirrors `get_rpe_config` / `get_single_rpe_config` of the release (its
`irpe.py`), with frozen (hashable) dataclasses instead of mutable dicts so
that configs can be fields of Flax modules and keys of caches.
"""

import dataclasses
from typing import Optional, Tuple, Union

from irpe_jax import _checks
from irpe_jax import buckets

MODES = ('bias', 'contextual')
_MODE_ALIASES = {'bias': 'bias', 'contextual': 'contextual',
                 'ctx': 'contextual'}
INDEX_FNS = ('piecewise', 'clip')
# The ratio the release uses with each method (its DeiT models, and the
# paper's Table 1).
METHOD_RATIOS = {buckets.EUCLIDEAN: 20, buckets.QUANT: 33, buckets.CROSS: 20,
                 buckets.PRODUCT: 1.9}
# Most buckets one table may have, the skip bucket included. The largest
# table of the paper has 133 (quant, ratio 33); a product table grows with
# ratio squared, and ratio 1e4 would ask for 1.6e9 buckets (gigabytes per
# feature of the head). 2**18 admits product ratios below 128 (511 x 511
# offsets, exact within 127 patches) and the other methods' below 65536.
MAX_BUCKETS = 2 ** 18


def canonical_mode(mode: str) -> str:
  """Maps 'bias', 'contextual' or the alias 'ctx' to its canonical name."""
  name = _MODE_ALIASES.get(mode) if isinstance(mode, str) else None
  if name is None:
    raise ValueError(f'Unknown mode {mode!r}; expected one of '
                     f'{sorted(_MODE_ALIASES)}.')
  return name


def piecewise_params(ratio: float) -> Tuple[float, float, float]:
  """`(alpha, beta, gamma) = (ratio, 2 ratio, 8 ratio)`, as the release sets.

  Args:
    ratio: a finite number > 0 (a numpy scalar too).

  Returns:
    The parameters of the piecewise index function, as Python floats.
  """
  ratio = _checks.check_number('ratio', ratio, minimum=0,
                               exclusive_minimum=True)
  return 1.0 * ratio, 2.0 * ratio, 8.0 * ratio


def _max_ratio(method: str) -> float:
  """Ratios of `method` below this give at most `MAX_BUCKETS` buckets.

  A table has `side = 2 * int(2 * ratio) + 1` buckets per axis (`side ** 2`
  for product), plus one skip bucket.
  """
  side = MAX_BUCKETS - 1
  if method == buckets.PRODUCT:
    side = int((MAX_BUCKETS - 1) ** 0.5)
  max_beta = (side - 1) // 2
  return (max_beta + 1) / 2


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
    ratio: sets `alpha = ratio, beta = 2 ratio, gamma = 8 ratio`; finite,
      > 0, and small enough for at most `MAX_BUCKETS` buckets per table
      (product: ratio < 128; the other methods: ratio < 65536).
    method: 'euc' | 'euclidean', 'quant' | 'quantization', 'cross' or
      'product', or the release's METHOD id (0, 1, 4, 3).
    mode: 'bias', 'contextual' or 'ctx'.
    shared_head: share one table across heads.
    skip: number of leading non-spatial tokens (>= 0); any `skip > 0` adds one
      bucket.
    index_fn: 'piecewise' or 'clip'.

  Returns:
    A frozen `SingleRPEConfig`.
  """
  alpha, beta, gamma = piecewise_params(ratio)
  skip = _checks.check_int('skip', skip, 0)
  if index_fn not in INDEX_FNS:
    raise ValueError(f'index_fn must be one of {INDEX_FNS}, got '
                     f'{index_fn!r}.')
  method = buckets.canonical_method(method)
  if method in (buckets.CROSS_ROWS, buckets.CROSS_COLS):
    raise ValueError(f"method {method!r} is half of 'cross'; configure "
                     "method='cross' instead.")
  table_method = buckets.CROSS_ROWS if method == buckets.CROSS else method
  # Counted from beta directly: the bucket count of a huge ratio is a
  # Python int, never allocated.
  num_buckets = buckets.num_buckets_without_skip(table_method, beta) + (
      1 if skip > 0 else 0)
  if num_buckets > MAX_BUCKETS:
    raise ValueError(
        f'ratio={alpha:g} gives {method} tables of {num_buckets} buckets, more '
        f'than MAX_BUCKETS={MAX_BUCKETS}; ratio must be < '
        f'{_max_ratio(method):g} for method {method!r}.')
  return SingleRPEConfig(
      shared_head=bool(shared_head), mode=canonical_mode(mode), method=method,
      alpha=alpha, beta=beta, gamma=gamma, num_buckets=num_buckets,
      skip=skip, index_fn=index_fn)


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
