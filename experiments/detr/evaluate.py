r"""COCO box AP of a DETR checkpoint: a released `.pth` or a training run.

  python -m experiments.detr.evaluate \
      --config experiments/detr/configs/coco.py:rpe-2.0-product-ctx-1-k \
      --config.data.root /data/coco --checkpoint rpe-2.0-product-ctx-1-k.pth

`--checkpoint` is either a PyTorch checkpoint of the release (converted on
load by `irpe_jax.convert`) or the `--workdir` of `experiments.detr.train`
(its newest checkpoint that verifies). Prints AP, AP50, AP75, APs/m/l and
the recalls on the eval split `config.data` names: a COCO folder
(`data.root`) or, with `--config.data.source=tfds`, tfds' `coco/2017`
`validation` as `tfds build coco/2017` prepared it. Images are read one at
a time, never the whole split at once.
"""

import os
import tempfile
from typing import Any, Dict, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from experiments import checkpoints
from experiments import cli
from experiments import config_checks
from experiments import train as deit_train
from experiments.detr import sources
from experiments.detr import train
from irpe_jax import convert
from irpe_jax.models import detr


def load_variables(config: Any, path: str) -> Tuple[Dict[str, Any], str]:
  """`{'params', 'batch_stats'}` of a release `.pth` or a training workdir.

  A workdir is read through its verified checkpoints and never written to
  (`checkpoints.read_run`): damaged steps are skipped, newest first, and
  the variables must fit the config's model exactly.

  Returns:
    `(variables, description)`, e.g. `(variables, 'checkpoints/400')`.
  """
  model = train.build_model(config)
  if os.path.isdir(path):
    state, name = checkpoints.read_run(path, ('checkpoints',))
    if not isinstance(state, dict) or not {'params', 'batch_stats'} <= set(
        state):
      raise ValueError(f'{path}/{name.split()[0]} holds no params and '
                       'batch_stats: not a checkpoint of experiments.detr.'
                       'train.')
    shapes = jax.eval_shape(lambda rng: detr.init_variables(model, rng),
                            jax.random.key(0))
    saved = {'params': state['params'], 'batch_stats': state['batch_stats']}
    return checkpoints.match_params(
        saved, {k: shapes[k] for k in saved},
        os.path.join(path, name.split()[0])), name
  if not os.path.isfile(path):
    raise ValueError(f'--checkpoint {path!r} does not exist.')
  return convert.load_torch_checkpoint(path, model), os.path.basename(path)


def evaluate_checkpoint(config: Any, path: str,
                        cache_dir: Optional[str] = None) -> Dict[str, float]:
  """pycocotools' box metrics of the checkpoint at `path`.

  Args:
    config: a DETR config; `config.data` names the eval split (a COCO
      folder or a tfds dataset, see `sources.open_split`).
    path: a release `.pth` or a training workdir.
    cache_dir: where a tfds split's ground-truth json is written once
      (pycocotools reads a file); default a folder in the system's temp.
  """
  mesh = Mesh(np.array(jax.devices()), ('data',))
  examples = sources.open_split(config.data, 'eval',
                                num_classes=config.model.num_classes)
  ann = examples.annotation_file(cache_dir or os.path.join(
      tempfile.gettempdir(), 'irpe_jax_coco_gt'))
  model = train.build_model(config)
  _, predict_step = train.compiled_steps(
      model, train.recipe_of(config, 1), mesh)
  variables, name = load_variables(config, path)
  logging.info('Evaluating %s.', name)
  variables = deit_train.replicate(variables, NamedSharding(mesh, P()))
  return train.evaluate(predict_step, variables, examples, config, ann,
                        NamedSharding(mesh, P('data')))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  deit_train.configure_logging(flags.FLAGS.log_level)
  config_checks.check_detr_config(flags.FLAGS.config)
  metrics = evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.checkpoint)
  for name, value in metrics.items():
    print(f'{name:>6s} {value:.3f}')


if __name__ == '__main__':
  if 'config' not in flags.FLAGS:
    config_flags.DEFINE_config_file('config', None, 'DETR config.')
  flags.DEFINE_string('checkpoint', None, 'Release .pth or a train workdir.')
  flags.mark_flags_as_required(['config', 'checkpoint'])
  # One line for an expected error; a traceback with --log_level=debug.
  cli.run_with_config(main)
