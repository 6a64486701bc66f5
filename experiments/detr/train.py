r"""Trains and evaluates DETR with iRPE: the release's recipe, on JAX.

  python -m experiments.detr.train \
      --config experiments/detr/configs/coco.py:rpe-2.0-product-ctx-1-k \
      --workdir /tmp/detr_irpe --config.data.root /data/coco

The machinery is the DeiT one (`experiments.train`): all devices of all
hosts in one mesh, the batch sharded over them, parameters replicated;
checkpoints verified on restore with fallback past damaged ones
(`experiments.checkpoints`); non-finite steps never applied; metrics to
`metrics.jsonl`, TensorBoard and a progress bar. The step is DETR's
(`experiments.detr.steps`): Hungarian matching on device, the release's
set losses on every decoder layer. Batches are padded to a few fixed
shapes (`config.input.pad_sides`), so the step compiles at most
`len(pad_sides) ** 2` times. Evaluation is pycocotools' box AP.
"""

import functools
import os
import time
from typing import Any, Dict, Optional

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
from experiments import metrics as metrics_lib
from experiments import steps as base_steps
from experiments import train as deit_train
from experiments.detr import coco_eval
from experiments.detr import data
from experiments.detr import sources
from experiments.detr import steps
from irpe_jax import convert
from irpe_jax.models import detr

BATCH_KEYS = ('images', 'pixel_mask', 'labels', 'boxes', 'valid')


def build_model(config: Any) -> detr.DETR:
  return detr.DETR(**config.model.to_dict())


def recipe_of(config: Any, steps_per_epoch: int) -> steps.DetrRecipe:
  o = config.optim
  return steps.DetrRecipe(
      lr=o.lr, backbone_lr=o.backbone_lr, weight_decay=o.weight_decay,
      grad_clip_norm=o.grad_clip_norm,
      lr_drop_step=o.lr_drop_epoch * steps_per_epoch,
      freeze_stem=o.get('freeze_stem', True))


@functools.lru_cache(maxsize=8)
def compiled_steps(model: detr.DETR, recipe: steps.DetrRecipe, mesh: Mesh):
  """`(train_step, predict_step)` jitted for `mesh`, cached across runs."""
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P('data'))
  train_step = jax.jit(
      functools.partial(steps.train_step, model=model, recipe=recipe),
      donate_argnums=0, in_shardings=(replicated, batch),
      out_shardings=(replicated, replicated))
  predict_step = jax.jit(functools.partial(steps.predict_step, model=model),
                         in_shardings=(replicated, batch),
                         out_shardings=replicated)
  return train_step, predict_step


def evaluate(predict_step: Any, variables: Any, examples, config: Any,
             ann_file: str, sharding: NamedSharding) -> Dict[str, float]:
  """COCO box AP of `variables` on `examples` (batch padding dropped)."""
  detections = []
  size = config.input.eval_batch_size
  for batch in data.eval_batches(examples, size, config.input.eval_size,
                                 config.input.max_size,
                                 config.input.pad_sides,
                                 config.input.max_objects):
    real = len(batch['image_id'])
    # Pad the last batch to the full size: one compiled shape, and it
    # divides over the devices.
    padded = {k: np.concatenate([batch[k], np.repeat(batch[k][-1:],
                                                     size - real, 0)])
              for k in ('images', 'pixel_mask', 'orig_size')}
    out = jax.device_get(predict_step(
        variables, deit_train.global_batch(padded, sharding)))
    detections += coco_eval.detections_of(
        out, batch['image_id'], np.arange(size) < real)
  return coco_eval.coco_ap(ann_file, detections)


def init_state(model: detr.DETR, recipe: steps.DetrRecipe, config: Any
               ) -> Dict[str, Any]:
  """Step-0 state: initialised model, optionally a pretrained backbone.

  `config.backbone_init` is torchvision's ResNet `.pth` (the release's
  ImageNet start) or a `.msgpack` of backbone variables under DETR's names
  (`experiments.detr.pretrain_backbone`); '' trains from scratch.
  """
  rng = jax.random.key(config.seed)
  variables = detr.init_variables(model, rng)
  if config.backbone_init:
    if config.backbone_init.endswith('.msgpack'):
      backbone = convert.load_params(config.backbone_init)
    else:
      backbone = convert.load_torch_checkpoint(config.backbone_init, model)
    variables = detr.replace_backbone(model, variables, backbone)
  state = base_steps.init_state(variables['params'], recipe,
                                jax.random.fold_in(rng, 1))
  state['batch_stats'] = variables['batch_stats']
  return state


def train_and_evaluate(config: Any, workdir: str,
                       stop_at_step: Optional[int] = None) -> Dict[str, Any]:
  """Runs (or resumes) the training of `config` in `workdir`.

  Args:
    config: a config of `experiments/detr/configs`.
    workdir: checkpoints and metrics; an existing run resumes.
    stop_at_step: stop after checkpointing at this step (as a preempted
      job); None runs to the end.

  Returns:
    `{'step', 'state', 'eval', 'compiles'}`: the final step, the state on
    the host, the last eval metrics and the number of compiled train steps.
  """
  # Before any data is read or any step compiled.
  config_checks.check_detr_config(config)
  checkpoints.check_writable(workdir)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  for name in ('batch_size', 'eval_batch_size'):
    if config.input[name] % jax.device_count():
      raise ValueError(f'config.input.{name}={config.input[name]} must '
                       f'divide by the {jax.device_count()} devices.')
  # Read on demand (sources); a tfds eval split's ground truth is written
  # once to the workdir for pycocotools.
  train_examples = sources.open_split(config.data, 'train',
                                      num_classes=config.model.num_classes)
  eval_examples = (sources.open_split(config.data, 'eval',
                                      num_classes=config.model.num_classes)
                   if config.eval_every_steps >= 0 else [])
  eval_ann = (eval_examples.annotation_file(os.path.join(workdir, 'coco_gt'))
              if config.eval_every_steps >= 0 else '')
  per_epoch = max(len(train_examples) // config.input.batch_size, 1)
  total_steps = config.total_steps or config.num_epochs * per_epoch
  model = build_model(config)
  recipe = recipe_of(config, per_epoch)
  train_step, predict_step = compiled_steps(model, recipe, mesh)

  state = deit_train.replicate(init_state(model, recipe, config), replicated)
  ckpt = checkpoints.Checkpoints(workdir, config.keep_checkpoints,
                                 config.async_checkpoints)
  restored = ckpt.restore(state)
  if restored is not None:
    state = restored
  start_step = int(state['step'])
  logging.info('%d train images, %d steps from step %d on %d devices.',
               len(train_examples), total_steps, start_step,
               jax.device_count())

  writer = metrics_lib.MetricWriter(workdir, total_steps, start_step,
                                    config.progress_bar)
  # The data stream is a function of (seed, step): it resumes exactly.
  batches = data.train_batches(
      train_examples, config.input.batch_size // jax.process_count(),
      start_step, config.seed + jax.process_index(), config.input.scales,
      config.input.max_size, config.input.flip, config.input.pad_sides,
      config.input.max_objects, random_crop=data.crop_of(config.input),
      num_threads=config.input.get('num_threads', 0))
  eval_metrics, step = None, start_step
  nonfinite_seen, checked_at = int(state['nonfinite_steps']), start_step
  timer_start, timer_step = time.time(), start_step
  try:
    for step, batch in zip(range(start_step + 1, total_steps + 1), batches):
      batch = {k: batch[k] for k in BATCH_KEYS}
      state, train_metrics = train_step(
          state, deit_train.global_batch(batch, data_sharding))
      writer.advance(step)
      log = deit_train.is_time(step, config.log_every_steps, total_steps)
      evaluate_now = (config.eval_every_steps >= 0 and deit_train.is_time(
          step, config.eval_every_steps, total_steps))
      save = (deit_train.is_time(step, config.checkpoint_every_steps,
                                 total_steps) or step == stop_at_step)
      if log or evaluate_now or save:
        nonfinite_seen = deit_train.check_nonfinite(
            state, nonfinite_seen, checked_at, step, config.nonfinite_policy,
            ckpt.latest_step())
        checked_at = step
      if log:
        rate = (step - timer_step) / max(time.time() - timer_start, 1e-9)
        writer.write(step, {k: float(v) for k, v in jax.device_get(
            train_metrics).items()} | {'steps_per_sec': rate}, 'train')
        timer_start, timer_step = time.time(), step
      # Saved before the evaluation: an evaluation that stops (an image
      # that does not read) must not cost the step's state.
      if save:
        ckpt.save(step, state)
      if evaluate_now:
        eval_metrics = evaluate(
            predict_step, {'params': state['params'],
                           'batch_stats': state['batch_stats']},
            eval_examples, config, eval_ann, data_sharding)
        writer.write(step, eval_metrics, 'eval')
      if step == stop_at_step:
        break
  finally:
    ckpt.close()
    writer.close()
  return {'step': step, 'state': jax.device_get(state), 'eval': eval_metrics,
          'compiles': train_step._cache_size()}  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  # DeiT's --log_level and filter: this program's lines, not orbax's.
  deit_train.configure_logging(flags.FLAGS.log_level)
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Defined here, not at import: `experiments.train` (imported above for
  # its machinery) already owns the module-level --config and --workdir.
  if 'config' not in flags.FLAGS:
    config_flags.DEFINE_config_file('config', None, 'DETR config.')
    flags.DEFINE_string('workdir', None, 'Checkpoints and metrics.')
  flags.mark_flags_as_required(['config', 'workdir'])
  # One line for an expected error; a traceback with --log_level=debug.
  cli.run_with_config(main)
