"""Trains and evaluates DeiT with iRPE, from one CPU to a TPU pod.

The library of `experiments.deit.train` (the command). One program for every
scale: all devices of all hosts form one mesh, the
batch is sharded over them and the parameters are replicated (`jax.jit` with
`NamedSharding`). On a multi-host TPU pod run the same command on every host;
`jax.distributed.initialize()` finds the others (or pass
`--coordinator_address`, `--num_processes`, `--process_id`).

Each host reads and augments only its part of every global batch
(`input_pipeline`). A run that stops is resumed from the newest checkpoint
in `--workdir` that verifies (`experiments.lib.checkpoints`): params,
optimiser state, step, RNG and data position. The loop is the one DETR runs
too (`experiments.lib.loop`); the steps live in `steps`; every default
lives in the config (`configs/common.py`).
"""

import functools
from typing import Any, Dict, Iterable, Optional, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
import numpy as np

from experiments.deit import config_checks
from experiments.deit import input_pipeline
from experiments.deit import optim
from experiments.deit import steps
from experiments.lib import checkpoints
from experiments.lib import loop
from experiments.lib import metrics as metrics_lib
import irpe_jax
from irpe_jax import convert
from irpe_jax import models


def build_model(config: Any, num_classes: int) -> models.VisionTransformer:
  """The model of `config`: a registered name with overrides, or fields."""
  kwargs = dict(config.model)
  kwargs.update(num_classes=num_classes, img_size=config.input.image_size)
  if config.rpe:
    kwargs['rpe_config'] = irpe_jax.get_rpe_config(**config.rpe)
  if config.dtype != 'float32':
    kwargs['dtype'] = jnp.dtype(config.dtype)
  if config.model_name:
    return models.create_model(config.model_name, **kwargs)
  return models.VisionTransformer(**kwargs)


def total_steps_of(config: Any, num_train: int) -> Tuple[int, int]:
  """`(total_steps, warmup_steps)` from epochs or `config.total_steps`."""
  steps_per_epoch = max(num_train // config.input.batch_size, 1)
  total = config.total_steps or int(config.num_epochs * steps_per_epoch)
  warmup = int(config.optim.warmup_epochs * steps_per_epoch)
  if config.warmup_steps is not None:
    warmup = config.warmup_steps
  return total, warmup


def recipe_of(config: Any, total_steps: int,
              warmup_steps: int) -> steps.Recipe:
  """The step's hyper-parameters from the config (lr scaled by batch)."""
  return steps.Recipe(
      peak_lr=optim.scaled_learning_rate(config.optim.base_lr,
                                         config.input.batch_size,
                                         config.optim.reference_batch),
      total_steps=total_steps, warmup_steps=warmup_steps,
      warmup_lr=config.optim.warmup_lr, min_lr=config.optim.min_lr,
      weight_decay=config.optim.weight_decay,
      grad_clip_norm=config.optim.grad_clip_norm,
      label_smoothing=config.label_smoothing,
      mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
      mixup_switch_prob=config.mixup_switch_prob)


def load_pretrained(path: str, params: Any, model: Any) -> Any:
  """Fine-tuning init: a converted checkpoint minus its head.

  Args:
    path: `.pth`/`.npz` of the release or a Flax msgpack (`irpe_jax.convert`).
    params: freshly initialised params of `model`; their heads are kept.
    model: the model being trained (its grid sets the `pos_embed` size).

  Returns:
    `params` with every tensor but the heads taken from the checkpoint, the
    absolute position embedding resampled to the model's grid.

  Raises:
    ValueError: a tensor is missing, has the wrong shape or is not finite.
  """
  loaded = flax.traverse_util.flatten_dict(convert.load_params(path))
  fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  missing = sorted('/'.join(k) for k in fresh
                   if k not in loaded and k[0] not in ('head', 'head_dist'))
  if missing:
    raise ValueError(f'{path} lacks {missing}.')
  for key, value in fresh.items():
    if key[0] in ('head', 'head_dist'):
      continue
    new = jnp.asarray(loaded[key], value.dtype)
    if key == ('pos_embed',) and new.shape != value.shape:
      new = models.resample_posemb(new, model.grid_size,
                                   model.num_prefix_tokens)
    if new.shape != value.shape:
      raise ValueError(f'{"/".join(key)} of {path} has shape {new.shape}, '
                       f'the model needs {value.shape}.')
    fresh[key] = new
  params = flax.traverse_util.unflatten_dict(fresh)
  bad = checkpoints.nonfinite_leaves(params)
  if bad:
    raise ValueError(f'{path} holds non-finite values in {bad[:3]}: a model '
                     'to fine-tune must be finite.')
  return params


@functools.lru_cache(maxsize=8)
def compiled_steps(model: Any, recipe: steps.Recipe, mesh: Mesh) -> Tuple[
    Any, Any]:
  """`(train_step, eval_step)` jitted for `mesh`: batch sharded, rest copied.

  Cached on its (hashable) arguments, so that several runs in one process
  (tests, sweeps) compile each step once.
  """
  return loop.jit_steps(
      mesh, functools.partial(steps.train_step, model=model, recipe=recipe),
      functools.partial(steps.eval_step, model=model))


def evaluate(eval_step: Any, params: Any,
             batches: Iterable[Dict[str, np.ndarray]],
             sharding: NamedSharding) -> Dict[str, float]:
  """Mean eval loss, top-1 and top-5 over all batches (padding masked)."""
  sums = None
  for batch in batches:
    out = eval_step(params, loop.global_batch(batch, sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = max(float(sums.pop('count')), 1.0)
  return {k: float(v) / count for k, v in sums.items()}


def train_and_evaluate(config: Any, workdir: str,
                       stop_at_step: Optional[int] = None) -> Dict[str, Any]:
  """Runs (or resumes) the training of `config` in `workdir`.

  Args:
    config: a config from `experiments/deit/configs`.
    workdir: where checkpoints and metrics go; an existing run resumes.
    stop_at_step: stop (after checkpointing) once this step is reached, as a
      preempted job would; None runs to the end.

  Returns:
    `{'step', 'params', 'eval'}`: the final step, params (as host numpy) and
    the last eval metrics.
  """
  # Before any data is read or any step compiled.
  config_checks.check_deit_config(config)
  checkpoints.check_writable(workdir)

  # --- Devices, data, model -------------------------------------------------
  mesh = loop.data_mesh()
  replicated, data_sharding = loop.shardings(mesh)
  loop.check_divisible(config.input)
  train_source, num_classes = input_pipeline.get_source(
      config.dataset, config.train_split, config.data_dir)
  eval_source, _ = input_pipeline.get_source(
      config.dataset, config.eval_split, config.data_dir,
      classes_from=config.train_split)
  num_classes = config.num_classes or num_classes
  model = build_model(config, num_classes)
  total_steps, warmup_steps = total_steps_of(config, len(train_source))
  recipe = recipe_of(config, total_steps, warmup_steps)
  train_step, eval_step = compiled_steps(model, recipe, mesh)
  logging.info('%d train / %d eval examples, %d classes; %d steps on %d '
               'devices of %d processes.', len(train_source),
               len(eval_source), num_classes, total_steps, jax.device_count(),
               jax.process_count())

  # --- State: init, or restore from the workdir -----------------------------
  rng = jax.random.key(config.seed)
  image_shape = (1, config.input.image_size, config.input.image_size, 3)
  # Compiled unoptimised, once per model and process (see `jitted_init`).
  params = models.params.jitted_init(model)(
      rng, jnp.zeros(image_shape), train=False)['params']
  state = loop.replicate(
      steps.init_state(params, recipe, jax.random.fold_in(rng, 1)),
      replicated)
  ckpt = checkpoints.Checkpoints(workdir, config.keep_checkpoints,
                                 config.async_checkpoints)
  restored = ckpt.restore(state)
  if restored is not None:
    state = restored
  elif config.init_from:
    params = load_pretrained(config.init_from,
                             jax.device_get(state['params']), model)
    state = loop.replicate(
        steps.init_state(params, recipe, jax.random.fold_in(rng, 1)),
        replicated)
  start_step = int(state['step'])
  logging.info('Starting at step %d of %d.', start_step, total_steps)

  # --- Loop -----------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir, total_steps, start_step,
                                    config.progress_bar)
  # The data stream is a function of (seed, step): it resumes exactly.
  batches = input_pipeline.train_iterator(
      train_source, config.input, start_step, total_steps, config.seed)

  def evaluate_state(state):
    return evaluate(eval_step, state['params'],
                    input_pipeline.eval_batches(eval_source, config.input),
                    data_sharding)

  result = loop.train_loop(
      state=state, batches=batches, train_step=train_step,
      sharding=data_sharding,
      schedule=loop.Schedule.of(config, total_steps, stop_at_step),
      checkpoints=ckpt, writer=writer,
      nonfinite_policy=config.nonfinite_policy,
      batch_size=config.input.batch_size, evaluate=evaluate_state)
  return {'step': result.step,
          'params': jax.device_get(result.state['params']),
          'eval': result.eval}
