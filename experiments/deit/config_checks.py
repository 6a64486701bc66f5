"""Checks of a DeiT config, before any data is read or any step compiled.

Written with the shared checks of `experiments.lib.config_checks`.
"""

import inspect
from typing import Any

from experiments.lib import cli
from experiments.lib import config_checks as checks


def check_deit_config(config: Any) -> None:
  """Checks a config of `experiments.deit.train` (see `configs/common.py`).

  Raises:
    checks.ConfigError: for the first key or value the run cannot use.
  """
  # Imported here: configs/common.py and the models are heavier than cli.
  import irpe_jax  # pylint: disable=g-import-not-at-top
  from experiments.deit.configs import common  # pylint: disable=g-import-not-at-top
  from irpe_jax import models  # pylint: disable=g-import-not-at-top

  checks.known_keys(config, common.DESCRIPTIONS,
                    open_sections=('model', 'rpe'))
  checks.section_fields(config, 'model',
                        checks.dataclass_fields(models.VisionTransformer),
                        'irpe_jax.models.VisionTransformer')
  checks.attention_impl(config)
  checks.section_fields(config, 'rpe',
                        inspect.signature(irpe_jax.get_rpe_config).parameters,
                        'irpe_jax.get_rpe_config')
  checks.schedule_keys(config)
  checks.int_at_least(config, 'eval_every_steps', 0)
  checks.int_at_least(config, 'num_classes', 1, optional=True)
  checks.int_at_least(config, 'warmup_steps', 0, optional=True)
  for key in ('input.batch_size', 'input.eval_batch_size',
              'input.image_size', 'optim.reference_batch'):
    checks.int_at_least(config, key, 1)
  checks.int_at_least(config, 'input.num_threads', 0)
  checks.int_at_least(config, 'input.prefetch', 0)
  checks.int_at_least(config, 'input.randaugment_ops', 0)
  checks.number_in(config, 'input.randaugment_magnitude', 0)
  checks.number_in(config, 'input.randaugment_magnitude_std', 0)
  checks.number_in(config, 'input.random_erasing', 0, 1)
  checks.number_in(config, 'input.max_bad_images', 0, 1)
  checks.number_in(config, 'input.crop_fraction', 0, 1, low_open=True)
  scale = config.input.crop_scale
  if (not isinstance(scale, (tuple, list)) or len(scale) != 2
      or not all(checks.is_number(s) for s in scale)
      or not 0 < scale[0] <= scale[1] <= 1):
    checks.fail('input.crop_scale', scale,
                '(min, max) with 0 < min <= max <= 1')
  for key in ('mixup_alpha', 'cutmix_alpha', 'optim.weight_decay',
              'optim.warmup_epochs', 'optim.warmup_lr', 'optim.min_lr',
              'optim.grad_clip_norm'):
    checks.number_in(config, key, 0)
  checks.number_in(config, 'optim.base_lr', 0, low_open=True)
  checks.number_in(config, 'mixup_switch_prob', 0, 1)
  checks.number_in(config, 'label_smoothing', 0, 1)
  checks.one_of(config, 'dtype', checks.DTYPES)
  if config.model_name is not None and (
      config.model_name not in models.list_models()):
    guess = cli.nearest(config.model_name, models.list_models())
    checks.fail('model_name', config.model_name, 'a name of '
                'irpe_jax.models.list_models()' + (
                    f' such as {guess!r}' if guess else ''))
  if config.rpe:
    try:
      irpe_jax.get_rpe_config(**config.rpe)
    except (TypeError, ValueError) as e:
      raise checks.ConfigError(f'config.rpe={dict(config.rpe)}: {e}') from e
