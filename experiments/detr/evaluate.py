r"""COCO box AP of a DETR checkpoint: a released `.pth` or a training run.

  python -m experiments.detr.evaluate \
      --config experiments/detr/configs/coco.py:rpe-2.0-product-ctx-1-k \
      --config.data.root /data/coco --checkpoint rpe-2.0-product-ctx-1-k.pth

`--checkpoint` is either a PyTorch checkpoint of the release (converted on
load by `irpe_jax.convert`) or the `--workdir` of `experiments.detr.train`:
its `best/` (the variables of the best AP), else its newest checkpoint,
read through their SHA256SUMS (`experiments.lib.checkpoints.read_run`); a
damaged step is skipped, and the first line says which. Prints AP, AP50,
AP75, APs/m/l and the recalls on the eval split `config.data` names: a COCO
folder (`data.root`) or, with `--config.data.source=tfds`, tfds' `coco/2017`
`validation` as `tfds build coco/2017` prepared it. Images are read one at
a time, never the whole split at once.
"""

import os
import tempfile
from typing import Any, Dict, Optional, Tuple

from absl import app
from absl import flags
import jax

from experiments.detr import config_checks
from experiments.detr import sources
from experiments.detr import trainer
from experiments.lib import checkpoints
from experiments.lib import cli
from experiments.lib import loop
from irpe_jax import convert
from irpe_jax.models import detr


def load_variables(config: Any, path: str) -> Tuple[Dict[str, Any], str]:
  """`{'params', 'batch_stats'}` of a release `.pth` or a training workdir.

  A workdir is read through its verified checkpoints and never written to
  (`checkpoints.read_run`): `best/` first, then `checkpoints/`, newest
  first; damaged steps are skipped, and the variables must fit the config's
  model exactly.

  Returns:
    `(variables, description)`, e.g. `(variables, 'best/400')` or
    `(variables, 'checkpoints/400 (skipped the damaged best/400: ...)')`.
  """
  model = trainer.build_model(config)
  if os.path.isdir(path):
    state, name = checkpoints.read_run(path)
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
  mesh = loop.data_mesh()
  replicated, data_sharding = loop.shardings(mesh)
  examples = sources.open_split(config.data, 'eval',
                                num_classes=config.model.num_classes)
  ann = examples.annotation_file(cache_dir or os.path.join(
      tempfile.gettempdir(), 'irpe_jax_coco_gt'))
  model = trainer.build_model(config)
  _, predict_step = trainer.compiled_steps(
      model, trainer.recipe_of(config, 1), mesh)
  variables, name = load_variables(config, path)
  print(f'Evaluating {name} on {len(examples)} images on '
        f'{jax.device_count()} {jax.default_backend()} device(s).',
        flush=True)
  variables = loop.replicate(variables, replicated)
  return trainer.evaluate(predict_step, variables, examples, config, ann,
                          data_sharding)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  cli.configure_logging(flags.FLAGS.log_level)
  config_checks.check_detr_config(flags.FLAGS.config)
  metrics = evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.checkpoint)
  for name, value in metrics.items():
    print(f'{name:>6s} {value:.3f}')


if __name__ == '__main__':
  cli.define_config_flag('DETR config (experiments/detr/configs/*.py[:ARG]) '
                         'whose model and eval split to use.')
  flags.DEFINE_string('checkpoint', None, "The release's .pth, or a "
                      'workdir of experiments.detr.train.')
  flags.mark_flag_as_required('checkpoint')
  cli.define_log_level_flag()
  flags.adopt_module_key_flags(cli)  # --help lists them.
  # One line for an expected error; a traceback with --log_level=debug.
  cli.run_with_config(main)
