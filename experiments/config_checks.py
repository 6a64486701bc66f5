"""Checks of a training config, run before any data is read or step compiled.

A value that would fail later (a zero batch is a ZeroDivisionError deep in
the input pipeline), or worse, succeed at nothing (`total_steps=-5` trains
no step and exits 0; `keep_checkpoints=0` leaves nothing to resume from),
is a `ValueError` here naming the key, the value and what is expected. A key
the program does not know (a typo in a config file, which ml_collections
would add silently) is an error naming the nearest known key.
"""

import dataclasses
import inspect
import numbers
from typing import Any, Iterable, Optional, Sequence, Tuple

from experiments import cli

NONFINITE_POLICIES = ('stop', 'skip')
DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """A config value or key that the program cannot run with."""


def _get(config: Any, key: str) -> Any:
  return cli.config_value(config, key)


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(key: str, value: Any, expected: str) -> None:
  raise ConfigError(f'config.{key}={value!r}; expected {expected}.')


def int_at_least(config: Any, key: str, minimum: int,
                 optional: bool = False) -> None:
  """`config.KEY` is an int >= `minimum` (or None, if `optional`)."""
  value = _get(config, key)
  if optional and value is None:
    return
  if not _is_int(value) or value < minimum:
    _fail(key, value, f'an int >= {minimum}' + (' or None' if optional
                                                  else ''))


def number_in(config: Any, key: str, low: float, high: Optional[float] = None,
              low_open: bool = False) -> None:
  """`config.KEY` is a number in `[low, high]` (`(low, high]` if `low_open`)."""
  value = _get(config, key)
  ok = _is_number(value) and value == value and (
      value > low if low_open else value >= low) and (
          high is None or value <= high)
  if not ok:
    bounds = (('(' if low_open else '[') + f'{low}, '
              + ('inf)' if high is None else f'{high}]'))
    _fail(key, value, f'a number in {bounds}')


def attention_impl(config: Any) -> None:
  """`model.attention_impl`, where set, names an attention impl."""
  from irpe_jax import attention  # pylint: disable=g-import-not-at-top
  if 'attention_impl' in config.get('model', {}):
    one_of(config, 'model.attention_impl', attention.ATTENTION_IMPLS)


def one_of(config: Any, key: str, options: Sequence[Any]) -> None:
  value = _get(config, key)
  if value not in options:
    _fail(key, value, f'one of {tuple(options)}')


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
  """The keys of `config.SECTION` are fields of `owner` (a class or function)."""
  value = _get(config, section)
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


def check_deit_config(config: Any) -> None:
  """Checks a config of `experiments.train` (see `configs/common.py`).

  Raises:
    ConfigError: for the first key or value the run cannot use.
  """
  # Imported here: configs/common.py and the models are heavier than cli.
  import irpe_jax  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from irpe_jax import models  # pylint: disable=g-import-not-at-top

  known_keys(config, common.DESCRIPTIONS, open_sections=('model', 'rpe'))
  section_fields(config, 'model', dataclass_fields(models.VisionTransformer),
                 'irpe_jax.models.VisionTransformer')
  attention_impl(config)
  section_fields(config, 'rpe',
                 inspect.signature(irpe_jax.get_rpe_config).parameters,
                 'irpe_jax.get_rpe_config')
  schedule_keys(config)
  int_at_least(config, 'eval_every_steps', 0)
  int_at_least(config, 'num_classes', 1, optional=True)
  int_at_least(config, 'warmup_steps', 0, optional=True)
  for key in ('input.batch_size', 'input.eval_batch_size',
              'input.image_size', 'optim.reference_batch'):
    int_at_least(config, key, 1)
  int_at_least(config, 'input.num_threads', 0)
  int_at_least(config, 'input.prefetch', 0)
  int_at_least(config, 'input.randaugment_ops', 0)
  number_in(config, 'input.randaugment_magnitude', 0)
  number_in(config, 'input.randaugment_magnitude_std', 0)
  number_in(config, 'input.random_erasing', 0, 1)
  number_in(config, 'input.max_bad_images', 0, 1)
  number_in(config, 'input.crop_fraction', 0, 1, low_open=True)
  scale = config.input.crop_scale
  if (not isinstance(scale, (tuple, list)) or len(scale) != 2
      or not all(_is_number(s) for s in scale)
      or not 0 < scale[0] <= scale[1] <= 1):
    _fail('input.crop_scale', scale, '(min, max) with 0 < min <= max <= 1')
  for key in ('mixup_alpha', 'cutmix_alpha', 'optim.weight_decay',
              'optim.warmup_epochs', 'optim.warmup_lr', 'optim.min_lr',
              'optim.grad_clip_norm'):
    number_in(config, key, 0)
  number_in(config, 'optim.base_lr', 0, low_open=True)
  number_in(config, 'mixup_switch_prob', 0, 1)
  number_in(config, 'label_smoothing', 0, 1)
  one_of(config, 'dtype', DTYPES)
  if config.model_name is not None and (
      config.model_name not in models.list_models()):
    guess = cli.nearest(config.model_name, models.list_models())
    _fail('model_name', config.model_name, 'a name of '
          'irpe_jax.models.list_models()' + (f' such as {guess!r}' if guess
                                              else ''))
  if config.rpe:
    try:
      irpe_jax.get_rpe_config(**config.rpe)
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config.rpe={dict(config.rpe)}: {e}') from e


def check_detr_config(config: Any) -> None:
  """Checks a config of `experiments.detr.train` (see `detr/configs/coco.py`).

  Raises:
    ConfigError: for the first key or value the run cannot use.
  """
  from experiments.detr.configs import coco  # pylint: disable=g-import-not-at-top
  from irpe_jax.models import detr  # pylint: disable=g-import-not-at-top

  reference = coco.get_config('plain')
  known_keys(config, cli.config_paths(reference), open_sections=('model',))
  section_fields(config, 'model', dataclass_fields(detr.DETR),
                 'irpe_jax.models.DETR')
  attention_impl(config)
  schedule_keys(config)
  int_at_least(config, 'eval_every_steps', -1)   # -1: never evaluate.
  int_at_least(config, 'num_train_examples', 1)
  one_of(config, 'data.source', ('folder', 'tfds'))
  for key in ('input.batch_size', 'input.eval_batch_size',
              'input.max_objects', 'model.num_classes', 'model.num_queries'):
    int_at_least(config, key, 1)
  int_at_least(config, 'input.max_size', 1, optional=True)
  int_at_least(config, 'input.eval_size', 1, optional=True)
  int_at_least(config, 'input.num_threads', 0)
  int_at_least(config, 'optim.lr_drop_epoch', 0)
  for key in ('input.scales', 'input.pad_sides'):
    sides = _get(config, key)
    if not isinstance(sides, (tuple, list)) or not all(
        _is_int(s) and s > 0 for s in sides):
      _fail(key, sides, 'a tuple of positive ints')
  if not config.input.pad_sides:
    _fail('input.pad_sides', config.input.pad_sides, 'at least one side')
  if config.input.max_objects > config.model.num_queries:
    raise ConfigError(
        f'config.input.max_objects={config.input.max_objects} must not '
        f'exceed config.model.num_queries={config.model.num_queries}: each '
        'object is matched to its own query.')
  number_in(config, 'optim.lr', 0, low_open=True)
  for key in ('optim.backbone_lr', 'optim.weight_decay',
              'optim.grad_clip_norm'):
    number_in(config, key, 0)
  try:
    detr.parse_enc_rpe2d(config.model.enc_rpe2d)
  except ValueError as e:
    raise ConfigError(f'config.model.enc_rpe2d: {e}') from e
