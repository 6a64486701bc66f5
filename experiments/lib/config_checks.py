"""Checks of a training config, run before any data is read or step compiled.

A value that would fail later (a zero batch is a ZeroDivisionError deep in
the input pipeline), or worse, succeed at nothing (`total_steps=-5` trains
no step and exits 0; `keep_checkpoints=0` leaves nothing to resume from),
is a `ValueError` here naming the key, the value and what is expected. A key
the program does not know (a typo in a config file, which ml_collections
would add silently) is an error naming the nearest known key.

The checks every config shares live here (`schedule_keys`, and the helpers
each project's own checks are written with: `experiments.deit.config_checks`,
`experiments.detr.config_checks`).
"""

import dataclasses
import numbers
from typing import Any, Iterable, Optional, Sequence, Tuple

from experiments.lib import cli

NONFINITE_POLICIES = ('stop', 'skip')
DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """A config value or key that the program cannot run with."""


def get(config: Any, key: str) -> Any:
  return cli.config_value(config, key)


def is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fail(key: str, value: Any, expected: str) -> None:
  raise ConfigError(f'config.{key}={value!r}; expected {expected}.')


def int_at_least(config: Any, key: str, minimum: int,
                 optional: bool = False) -> None:
  """`config.KEY` is an int >= `minimum` (or None, if `optional`)."""
  value = get(config, key)
  if optional and value is None:
    return
  if not is_int(value) or value < minimum:
    fail(key, value, f'an int >= {minimum}' + (' or None' if optional
                                                 else ''))


def number_in(config: Any, key: str, low: float, high: Optional[float] = None,
              low_open: bool = False) -> None:
  """`config.KEY` is a number in `[low, high]` (`(low, high]` if `low_open`)."""
  value = get(config, key)
  ok = is_number(value) and value == value and (
      value > low if low_open else value >= low) and (
          high is None or value <= high)
  if not ok:
    bounds = (('(' if low_open else '[') + f'{low}, '
              + ('inf)' if high is None else f'{high}]'))
    fail(key, value, f'a number in {bounds}')


def attention_impl(config: Any) -> None:
  """`model.attention_impl`, where set, names an attention impl."""
  from irpe_jax import attention  # pylint: disable=g-import-not-at-top
  if 'attention_impl' in config.get('model', {}):
    one_of(config, 'model.attention_impl', attention.ATTENTION_IMPLS)


def one_of(config: Any, key: str, options: Sequence[Any]) -> None:
  value = get(config, key)
  if value not in options:
    fail(key, value, f'one of {tuple(options)}')


def known_keys(config: Any, known: Iterable[str], open_sections: Sequence[
    str] = ()) -> None:
  """Every key of `config` is in `known` (keys under an open section too).

  Args:
    config: the config.
    known: the dotted keys the program reads.
    open_sections: sections whose keys are checked by their consumer (a
      model's fields), given as `(section)`; their own keys are not listed.

  Raises:
    ConfigError: naming the first unknown key and the nearest known one.
  """
  known = list(known)
  sections = {k.rsplit('.', 1)[0] for k in known if '.' in k}
  known += sorted(sections - set(known))
  for key in cli.config_paths(config):
    if key in known or any(key.startswith(s + '.') for s in open_sections):
      continue
    guess = cli.nearest(key, known)
    raise ConfigError(
        f'config.{key} is not a key this program reads'
        + (f'; did you mean config.{guess}?' if guess else '.'))


def section_fields(config: Any, section: str, fields: Iterable[str],
                   owner: str) -> None:
  """The keys of `config.SECTION` are fields of `owner` (class or function)."""
  value = get(config, section)
  if value is None:
    return
  fields = list(fields)
  for key in value.keys():
    if key not in fields:
      guess = cli.nearest(key, fields)
      raise ConfigError(
          f'config.{section}.{key} is not a field of {owner}'
          + (f'; did you mean config.{section}.{guess}?' if guess else '.'))


def dataclass_fields(cls: type) -> Tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.name not in ('parent', 'name'))


def schedule_keys(config: Any) -> None:
  """Length, logging and checkpointing of a run (DeiT and DETR alike)."""
  int_at_least(config, 'seed', 0)
  int_at_least(config, 'total_steps', 0)
  if config.total_steps == 0:
    number_in(config, 'num_epochs', 0, low_open=True)
  int_at_least(config, 'log_every_steps', 0)
  int_at_least(config, 'checkpoint_every_steps', 0)
  int_at_least(config, 'keep_checkpoints', 1)
  one_of(config, 'async_checkpoints', (True, False))
  one_of(config, 'progress_bar', (None, True, False))
  one_of(config, 'nonfinite_policy', NONFINITE_POLICIES)
