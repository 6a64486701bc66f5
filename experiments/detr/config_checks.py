"""Checks of a DETR config, before any data is read or any step compiled.

Written with the shared checks of `experiments.lib.config_checks`.
"""

from typing import Any

from experiments.lib import cli
from experiments.lib import config_checks as checks


def check_detr_config(config: Any) -> None:
  """Checks a config of `experiments.detr.train` (see `detr/configs/coco.py`).

  Raises:
    checks.ConfigError: for the first key or value the run cannot use.
  """
  from experiments.detr.configs import coco  # pylint: disable=g-import-not-at-top
  from irpe_jax.models import detr  # pylint: disable=g-import-not-at-top

  reference = coco.get_config('plain')
  checks.known_keys(config, cli.config_paths(reference),
                    open_sections=('model',))
  checks.section_fields(config, 'model', checks.dataclass_fields(detr.DETR),
                        'irpe_jax.models.DETR')
  checks.attention_impl(config)
  checks.schedule_keys(config)
  checks.int_at_least(config, 'eval_every_steps', -1)   # -1: never evaluate.
  checks.int_at_least(config, 'num_train_examples', 1)
  checks.one_of(config, 'data.source', ('folder', 'tfds'))
  for key in ('input.batch_size', 'input.eval_batch_size',
              'input.max_objects', 'model.num_classes', 'model.num_queries'):
    checks.int_at_least(config, key, 1)
  checks.int_at_least(config, 'input.max_size', 1, optional=True)
  checks.int_at_least(config, 'input.eval_size', 1, optional=True)
  checks.int_at_least(config, 'input.num_threads', 0)
  checks.int_at_least(config, 'optim.lr_drop_epoch', 0)
  checks.one_of(config, 'input.group_by_orientation', (True, False))
  for key in ('input.scales', 'input.pad_sides'):
    sides = checks.get(config, key)
    if not isinstance(sides, (tuple, list)) or not all(
        checks.is_int(s) and s > 0 for s in sides):
      checks.fail(key, sides, 'a tuple of positive ints')
  if not config.input.pad_sides:
    checks.fail('input.pad_sides', config.input.pad_sides,
                'at least one side')
  if config.input.max_objects > config.model.num_queries:
    raise checks.ConfigError(
        f'config.input.max_objects={config.input.max_objects} must not '
        f'exceed config.model.num_queries={config.model.num_queries}: each '
        'object is matched to its own query.')
  checks.number_in(config, 'optim.lr', 0, low_open=True)
  for key in ('optim.backbone_lr', 'optim.weight_decay',
              'optim.grad_clip_norm'):
    checks.number_in(config, key, 0)
  try:
    detr.parse_enc_rpe2d(config.model.enc_rpe2d)
  except ValueError as e:
    raise checks.ConfigError(f'config.model.enc_rpe2d: {e}') from e
