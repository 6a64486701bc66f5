"""The lookup tables an iRPE module holds, for the Linen and NNX modules.

Both front ends resolve their constructor fields here and take the
parameter names and shapes from here, so they hold the same parameters.
Names and layouts are the release's (`iRPE` in its `irpe.py`), so converted
PyTorch weights drop in:

- bias mode (q/k only): `lookup_table_bias (Ht, nb)`;
- contextual mode: `lookup_table_weight (Ht, D, nb)` on q/k and
  `(Ht, nb, D)` on v;
- the cross method: one such table under each of `rp_rows` and `rp_cols`.
"""

import dataclasses
from typing import Any, Optional, Sequence, Tuple

from irpe_jax import _checks
from irpe_jax import buckets
from irpe_jax import config as config_lib
from irpe_jax import ops

BIAS_TABLE = 'lookup_table_bias'
CONTEXTUAL_TABLE = 'lookup_table_weight'
# The children of a cross module and the bucket method of each.
CROSS_HALVES = (('rp_rows', buckets.CROSS_ROWS),
                ('rp_cols', buckets.CROSS_COLS))


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One lookup table (or, for 'cross', each of the pair), resolved.

  Attributes:
    mode: 'bias' or 'contextual'.
    method: 'euc', 'quant', 'product', 'cross_rows', 'cross_cols', or
      'cross' for a module holding the pair.
    for_qk: True for a table encoding q or k (looked up with `(B, H, L, D)`
      queries or keys), False for one on v (looked up with the
      `(B, H, L, L)` attention weights). The release calls it `transposed`.
    num_heads: `Ht`, 1 for a table shared by all heads.
    head_dim: `D`.
    num_buckets: `nb`, including the skip bucket.
  """
  mode: str
  method: str
  for_qk: bool
  num_heads: int
  head_dim: int
  num_buckets: int

  @property
  def param_name(self) -> str:
    """The release's name of the table."""
    return BIAS_TABLE if self.mode == 'bias' else CONTEXTUAL_TABLE

  @property
  def shape(self) -> Tuple[int, ...]:
    """`(Ht, nb)` bias, `(Ht, D, nb)` contextual q/k, `(Ht, nb, D)` v."""
    if self.mode == 'bias':
      return (self.num_heads, self.num_buckets)
    if self.for_qk:
      return (self.num_heads, self.head_dim, self.num_buckets)
    return (self.num_heads, self.num_buckets, self.head_dim)


def resolve_table(rpe_config: config_lib.SingleRPEConfig, *, head_dim: int,
                  num_heads: int, mode: Optional[str], method: Optional[str],
                  for_qk: bool, num_buckets: Optional[int], impl: str,
                  cross: bool) -> TableSpec:
  """Checks a module's fields; mode, method and buckets default to the config.

  Args:
    rpe_config: the module's `SingleRPEConfig`.
    head_dim: `D`, features per head.
    num_heads: `Ht`, heads of the table.
    mode: 'bias', 'contextual' or 'ctx'; None for the config's.
    method: a method name or release id; None for the config's.
    for_qk: see `TableSpec`.
    num_buckets: None for the config's.
    impl: the lookup implementation, see `irpe_jax.ops`.
    cross: True for the module holding a cross pair (which needs method
      'cross'), False for a single-table module (which refuses it).

  Returns:
    The module's `TableSpec`.
  """
  if not isinstance(rpe_config, config_lib.SingleRPEConfig):
    raise TypeError('rpe_config must be a SingleRPEConfig (see '
                    f'get_single_rpe_config), got {rpe_config!r}.')
  head_dim = _checks.check_int('head_dim', head_dim, 1)
  num_heads = _checks.check_int('num_heads', num_heads, 1)
  mode = config_lib.canonical_mode(rpe_config.mode if mode is None else mode)
  method = buckets.canonical_method(
      rpe_config.method if method is None else method)
  if mode == 'bias' and not for_qk:
    raise ValueError("mode='bias' does not exist on v (for_qk=False).")
  if cross and method != buckets.CROSS:
    raise ValueError(f"IRPECross needs method='cross', got {method!r}.")
  if not cross and method == buckets.CROSS:
    raise ValueError("method='cross' holds two tables: use IRPECross.")
  ops.resolve_impl(impl)
  num_buckets = _checks.check_int(
      'num_buckets',
      rpe_config.num_buckets if num_buckets is None else num_buckets, 1,
      config_lib.MAX_BUCKETS)
  return TableSpec(mode=mode, method=method, for_qk=bool(for_qk),
                   num_heads=num_heads, head_dim=head_dim,
                   num_buckets=num_buckets)


def build_single(rpe_config: Optional[config_lib.SingleRPEConfig],
                 for_qk: bool, head_dim: int, num_heads: int,
                 classes: Sequence[type], **kwargs: Any) -> Optional[Any]:
  """The module for one of q/k/v, or None where the config is None.

  Args:
    rpe_config: the config of that target, or None.
    for_qk: True on q and k, False on v.
    head_dim: features per head.
    num_heads: attention heads (the table has 1 when shared).
    classes: the front end's `(IRPE, IRPECross)`.
    **kwargs: further module arguments (`impl`, `table_init`, `dtype`, ...).
  """
  if rpe_config is None:
    return None
  single, cross = classes
  cls = cross if rpe_config.method == buckets.CROSS else single
  return cls(head_dim=head_dim,
             num_heads=1 if rpe_config.shared_head else num_heads,
             for_qk=for_qk, rpe_config=rpe_config, **kwargs)


def targets(config: Optional[config_lib.RPEConfig]
            ) -> Tuple[Tuple[str, Optional[config_lib.SingleRPEConfig], bool],
                       ...]:
  """`(name, config, for_qk)` of rpe_q, rpe_k and rpe_v; None configs if none.

  Raises:
    TypeError: if `config` is neither None nor an `RPEConfig`.
  """
  if config is not None and not isinstance(config, config_lib.RPEConfig):
    raise TypeError(f'config must be an RPEConfig (see get_rpe_config), got '
                    f'{config!r}.')
  return tuple((name, None if config is None else getattr(config, name),
                name != 'rpe_v') for name in ('rpe_q', 'rpe_k', 'rpe_v'))


def build_all(config: Optional[config_lib.RPEConfig], head_dim: int,
              num_heads: int, classes: Sequence[type], **kwargs: Any
              ) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
  """`(rpe_q, rpe_k, rpe_v)` of a config, each a module or None."""
  return tuple(build_single(single, for_qk, head_dim, num_heads, classes,
                            **kwargs)
               for _, single, for_qk in targets(config))
