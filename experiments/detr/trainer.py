"""Trains and evaluates DETR with iRPE: the release's recipe, on JAX.

The library of `experiments.detr.train` (the command). The loop is the one
DeiT runs (`experiments.lib.loop`): all devices of all hosts in one mesh,
the batch sharded over them, parameters replicated; checkpoints verified on
restore with fallback past damaged ones, and the best AP kept in `best/`
(`experiments.lib.checkpoints`); non-finite steps never applied; metrics
(with the rate of training alone) to `metrics.jsonl`, TensorBoard and a
progress bar. The step is DETR's (`experiments.detr.steps`): Hungarian
matching on device, the release's set losses on every decoder layer.

Global batch `s` is a function of `(seed, s)`; each host reads and augments
its rows of it (`data.train_batches`), grouped by orientation when the
images' sizes are known, and padded to one of a few fixed shapes
(`config.input.pad_sides`), so the step compiles at most
`len(pad_sides) ** 2` times. Evaluation is pycocotools' box AP.
"""

import functools
import os
from typing import Any, Dict, Optional

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
import numpy as np

from experiments.detr import coco_eval
from experiments.detr import config_checks
from experiments.detr import data
from experiments.detr import sources
from experiments.detr import steps
from experiments.lib import checkpoints
from experiments.lib import loop
from experiments.lib import metrics as metrics_lib
from experiments.lib import train_state
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
  return loop.jit_steps(
      mesh, functools.partial(steps.train_step, model=model, recipe=recipe),
      functools.partial(steps.predict_step, model=model))


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
    # divides over the devices. Every host makes the whole batch (the same
    # padded shape) and passes its rows.
    mine = slice(jax.process_index() * size // jax.process_count(),
                 (jax.process_index() + 1) * size // jax.process_count())
    padded = {k: np.concatenate([batch[k], np.repeat(batch[k][-1:],
                                                     size - real, 0)])[mine]
              for k in ('images', 'pixel_mask', 'orig_size')}
    out = jax.device_get(predict_step(
        variables, loop.global_batch(padded, sharding)))
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
  state = train_state.init_state(variables['params'], recipe,
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
    the host, the last eval metrics and the number of padded batch shapes
    the step met (it compiles once for each).
  """
  # Before any data is read or any step compiled.
  config_checks.check_detr_config(config)
  checkpoints.check_writable(workdir)
  mesh = loop.data_mesh()
  replicated, data_sharding = loop.shardings(mesh)
  loop.check_divisible(config.input)
  # Read on demand (sources); a tfds eval split's ground truth is written
  # once to the workdir for pycocotools.
  train_examples = sources.open_split(config.data, 'train',
                                      num_classes=config.model.num_classes)
  evaluates = config.eval_every_steps >= 0
  eval_examples = (sources.open_split(config.data, 'eval',
                                      num_classes=config.model.num_classes)
                   if evaluates else [])
  eval_ann = (eval_examples.annotation_file(os.path.join(workdir, 'coco_gt'))
              if evaluates else '')
  per_epoch = max(len(train_examples) // config.input.batch_size, 1)
  total_steps = config.total_steps or config.num_epochs * per_epoch
  model = build_model(config)
  recipe = recipe_of(config, per_epoch)
  train_step, predict_step = compiled_steps(model, recipe, mesh)

  state = loop.replicate(init_state(model, recipe, config), replicated)
  ckpt = checkpoints.Checkpoints(workdir, config.keep_checkpoints,
                                 config.async_checkpoints, best_metric='AP')
  restored = ckpt.restore(state)
  if restored is not None:
    state = restored
  start_step = int(state['step'])
  logging.info('%d train images, %d steps from step %d on %d devices of %d '
               'processes.', len(train_examples), total_steps, start_step,
               jax.device_count(), jax.process_count())

  writer = metrics_lib.MetricWriter(workdir, total_steps, start_step,
                                    config.progress_bar)
  # The data stream is a function of (seed, step): it resumes exactly, on
  # any number of hosts.
  batches = data.train_batches(
      train_examples, config.input.batch_size, start_step, config.seed,
      config.input.scales, config.input.max_size, config.input.flip,
      config.input.pad_sides, config.input.max_objects,
      random_crop=data.crop_of(config.input),
      num_threads=config.input.num_threads,
      sizes=sources.image_sizes(train_examples),
      grouped=config.input.group_by_orientation,
      num_shards=jax.process_count(), shard_index=jax.process_index())

  def variables_of(state):
    return {'params': state['params'], 'batch_stats': state['batch_stats']}

  def evaluate_state(state):
    return evaluate(predict_step, variables_of(state), eval_examples, config,
                    eval_ann, data_sharding)

  result = loop.train_loop(
      state=state, batches=({k: b[k] for k in BATCH_KEYS} for b in batches),
      train_step=train_step, sharding=data_sharding,
      schedule=loop.Schedule.of(config, total_steps, stop_at_step),
      checkpoints=ckpt, writer=writer,
      nonfinite_policy=config.nonfinite_policy,
      batch_size=config.input.batch_size,
      evaluate=evaluate_state if evaluates else None, best_of=variables_of)
  return {'step': result.step, 'state': jax.device_get(result.state),
          'eval': result.eval, 'compiles': len(result.batch_shapes)}
