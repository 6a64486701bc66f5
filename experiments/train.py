r"""Trains and evaluates DeiT with iRPE, from one CPU to a TPU pod.

  python -m experiments.train \
      --config experiments/configs/deit_imagenet.py:small_k \
      --workdir /tmp/deit_s_irpe_k [--config.input.batch_size=256]

One program for every scale: all devices of all hosts form one mesh, the
batch is sharded over them and the parameters are replicated (`jax.jit` with
`NamedSharding`). On a multi-host TPU pod run the same command on every host;
`jax.distributed.initialize()` finds the others (or pass
`--coordinator_address`, `--num_processes`, `--process_id`).

Each host reads and augments only its part of every global batch
(`input_pipeline`). A run that stops is resumed from the last checkpoint in
`--workdir`: params, optimiser state, step, RNG and data position.
"""

import json
import os
import time
from typing import Any, Dict, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

import irpe_jax
from experiments import input_pipeline
from experiments import optim
from irpe_jax import convert
from irpe_jax import models

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training configuration (a Python file with get_config).')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard logs: a '
    'local path, or on a pod one every host sees (NFS, gcsfuse).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for a multi-host '
    'run outside a managed cluster (Cloud TPU and SLURM need none).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes of a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Index of this process.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with automatic '
    'cluster detection (Cloud TPU pods, SLURM).')


def build_model(config: Any, num_classes: int) -> models.VisionTransformer:
  """The model of `config`: a registered name with overrides, or fields."""
  kwargs = dict(config.model)
  kwargs.update(num_classes=num_classes, img_size=config.input.image_size)
  if config.get('rpe'):
    kwargs['rpe_config'] = irpe_jax.get_rpe_config(**config.rpe)
  if config.get('dtype', 'float32') != 'float32':
    kwargs['dtype'] = jnp.dtype(config.dtype)
  if config.get('model_name'):
    return models.create_model(config.model_name, **kwargs)
  return models.VisionTransformer(**kwargs)


def total_steps_of(config: Any, num_train: int) -> Tuple[int, int]:
  """`(total_steps, warmup_steps)` from epochs or `config.total_steps`."""
  steps_per_epoch = max(num_train // config.input.batch_size, 1)
  total = config.get('total_steps') or int(config.num_epochs * steps_per_epoch)
  warmup = int(config.optim.warmup_epochs * steps_per_epoch)
  if config.get('warmup_steps') is not None:
    warmup = config.warmup_steps
  return total, warmup


def load_pretrained(path: str, params: Any, model: Any) -> Any:
  """Fine-tuning init: a converted checkpoint minus its head.

  Args:
    path: `.pth`/`.npz` of the release or a Flax msgpack (`irpe_jax.convert`).
    params: freshly initialised params of `model`; their heads are kept.
    model: the model being trained (its grid sets the `pos_embed` size).

  Returns:
    `params` with every tensor but the heads taken from the checkpoint, the
    absolute position embedding resampled to the model's grid.
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
  return flax.traverse_util.unflatten_dict(fresh)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Places host values, equal on every process, replicated on `sharding`."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree)


class MetricWriter:
  """Metrics to the console, `metrics.jsonl` and TensorBoard (process 0).

  On a terminal a tqdm progress bar shows the step, its rate and the ETA,
  and metric lines print above it; elsewhere (a log file, CI) the bar is
  off. Train metric lines carry the rate and the ETA either way.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               progress_bar: Optional[bool] = None):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.tb = None
    # disable=None: tqdm turns itself off when stderr is not a terminal.
    self.bar = tqdm.tqdm(
        total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
        disable=(True if not self.enabled else
                 None if progress_bar is None else not progress_bar))
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard logs.')

  def write(self, step: int, metrics: Dict[str, float], prefix: str) -> None:
    if not self.enabled:
      return
    record = {'step': step, **{f'{prefix}/{k}': v for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    if self.tb is not None:
      for key, value in record.items():
        if key != 'step':
          self.tb.add_scalar(key, value, step)
      self.tb.flush()
    text = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
    eta = ''
    if prefix == 'train' and 'steps_per_sec' in metrics:
      seconds = (self.total_steps - step) / max(metrics['steps_per_sec'], 1e-9)
      eta = f' eta={time.strftime("%H:%M:%S", time.gmtime(seconds))}'
    line = (f'[{step:>7d}/{self.total_steps} '
            f'{100 * step / max(self.total_steps, 1):5.1f}%] {prefix}: '
            f'{text}{eta}')
    if self.bar.disable:
      print(line, flush=True)
    else:
      self.bar.write(line)
      if prefix == 'train' and 'loss' in metrics:
        self.bar.set_postfix(loss=f'{metrics["loss"]:.4g}', refresh=False)

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step`."""
    self.bar.update(step - self.bar.n)

  def close(self) -> None:
    self.bar.close()
    if self.enabled:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


def train_and_evaluate(config: Any, workdir: str,
                       stop_at_step: Optional[int] = None) -> Dict[str, Any]:
  """Runs (or resumes) the training of `config` in `workdir`.

  Args:
    config: a config from `experiments/configs`.
    workdir: where checkpoints and metrics go; an existing run resumes.
    stop_at_step: stop (after checkpointing) once this step is reached, as a
      preempted job would; None runs to the end.

  Returns:
    `{'step', 'params', 'eval'}`: the final step, params (as host numpy) and
    the last eval metrics.
  """
  # --- Devices, data, model -------------------------------------------------
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  if config.input.batch_size % jax.device_count():
    raise ValueError(f'batch_size={config.input.batch_size} must divide by '
                     f'the {jax.device_count()} devices.')
  train_source, num_classes = input_pipeline.get_source(
      config.dataset, config.train_split, config.get('data_dir'))
  eval_source, _ = input_pipeline.get_source(
      config.dataset, config.eval_split, config.get('data_dir'))
  num_classes = config.get('num_classes') or num_classes
  model = build_model(config, num_classes)
  total_steps, warmup_steps = total_steps_of(config, len(train_source))
  logging.info('%d train / %d eval examples, %d classes; %d steps on %d '
               'devices of %d processes.', len(train_source),
               len(eval_source), num_classes, total_steps, jax.device_count(),
               jax.process_count())

  peak_lr = optim.scaled_learning_rate(
      config.optim.base_lr, config.input.batch_size,
      config.optim.get('reference_batch', 512))
  schedule = optim.make_schedule(peak_lr, total_steps, warmup_steps,
                                 config.optim.get('min_lr', 1e-5),
                                 config.optim.get('warmup_lr', 1e-6))
  tx = optim.make_optimizer(schedule, config.optim.weight_decay,
                            config.optim.get('grad_clip_norm'))

  # --- State: init, or restore from the workdir -----------------------------
  image_shape = (1, config.input.image_size, config.input.image_size, 3)

  def init(rng):
    params = model.init(rng, jnp.zeros(image_shape), train=False)['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params),
            'rng': jax.random.key_data(jax.random.fold_in(rng, 1))}

  # Eager init: its small ops compile once per process and serve later runs
  # in it (tests, sweeps), where a jitted init recompiles for seconds.
  state = replicate(init(jax.random.key(config.seed)), replicated)
  # Synchronous saves by default: async ones of two managers raced across
  # processes in orbax 0.12 (metadata of one process validated too early).
  use_async = config.get('async_checkpoints', False)
  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.get('keep_checkpoints', 3), create=True,
          enable_async_checkpointing=use_async))
  best = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'best')),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m['top1'],
          best_mode='max', enable_async_checkpointing=use_async))
  data_position = 0  # steps of data consumed: the stream is a function of it.
  if checkpoints.latest_step() is not None:
    restored = checkpoints.restore(
        checkpoints.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            data=ocp.args.JsonRestore()))
    state, data_position = restored.state, restored.data['data_position']
    logging.info('Resumed at step %d, data position %d.', int(state['step']),
                 data_position)
  elif config.get('init_from'):
    params = load_pretrained(config.init_from,
                             jax.device_get(state['params']), model)
    state = replicate({**state, 'params': params,
                       'opt_state': tx.init(params)}, replicated)
  start_step = int(state['step'])

  # --- Steps ----------------------------------------------------------------
  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                             state['step'])
    mix_key, drop_key = jax.random.split(key)
    targets = input_pipeline.smooth_one_hot(batch['label'], num_classes,
                                            config.label_smoothing)
    images, targets = input_pipeline.mixup_cutmix(
        mix_key, batch['image'], targets, config.mixup_alpha,
        config.cutmix_alpha, config.get('mixup_switch_prob', 0.5))

    def loss_fn(params):
      logits = model.apply({'params': params}, images, train=True,
                           rngs={'dropout': drop_key})
      if isinstance(logits, tuple):  # distilled: no teacher here, same target.
        logits = (logits[0] + logits[1]) / 2
      return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                         targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': schedule(state['step'])}
    return {'step': state['step'] + 1, 'params': params,
            'opt_state': opt_state, 'rng': state['rng']}, metrics

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False)
    labels, mask = batch['label'], batch['mask']
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    return {'loss': jnp.sum(loss * mask),
            'top1': jnp.sum((top5[:, 0] == labels) * mask),
            'top5': jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
            'count': jnp.sum(mask)}

  train_step = jax.jit(train_step, donate_argnums=0,
                       in_shardings=(replicated, data_sharding),
                       out_shardings=(replicated, replicated))
  eval_step = jax.jit(eval_step, in_shardings=(replicated, data_sharding),
                      out_shardings=replicated)

  def global_batch(local):
    return {k: jax.make_array_from_process_local_data(data_sharding, v)
            for k, v in local.items()}

  def evaluate(params):
    sums = None
    for batch in input_pipeline.eval_batches(eval_source, config.input):
      out = eval_step(params, global_batch(batch))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = max(float(sums.pop('count')), 1.0)
    return {k: float(v) / count for k, v in sums.items()}

  def save(step, eval_metrics=None):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave({'data_position': step}))
    checkpoints.save(step, args=args, force=True)
    checkpoints.wait_until_finished()
    if eval_metrics is not None:
      best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state['params'])),
                metrics=eval_metrics, force=True)

  # --- Loop -----------------------------------------------------------------
  writer = MetricWriter(workdir, total_steps, start_step,
                        config.get('progress_bar'))
  batches = input_pipeline.train_iterator(
      train_source, config.input, data_position, total_steps, config.seed)
  log_every = config.get('log_every_steps', 50)
  eval_every = config.get('eval_every_steps', 0)
  ckpt_every = config.get('checkpoint_every_steps', 0)
  eval_metrics = None
  last_time, last_step = time.time(), start_step
  step = start_step
  while step < total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = train_step(state, global_batch(next(batches)))
    step += 1
    writer.advance(step)
    if step % log_every == 0 or step == total_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.time() - last_time
      rate = (step - last_step) / max(elapsed, 1e-9)
      writer.write(step, {k: float(v) for k, v in metrics.items()} | {
          'steps_per_sec': rate,
          'images_per_sec': rate * config.input.batch_size}, 'train')
      last_time, last_step = time.time(), step
    is_last = step == total_steps
    if (eval_every and step % eval_every == 0) or is_last:
      eval_metrics = evaluate(state['params'])
      writer.write(step, eval_metrics, 'eval')
      last_time = time.time()
    if (ckpt_every and step % ckpt_every == 0) or is_last or (
        step == stop_at_step):
      save(step, eval_metrics if (eval_every and step % eval_every == 0)
           or is_last else None)
    if stop_at_step is not None and step >= stop_at_step:
      break
  checkpoints.wait_until_finished()
  best.wait_until_finished()
  writer.close()
  return {'step': step, 'params': jax.device_get(state['params']),
          'eval': eval_metrics}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info('Process %d of %d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
