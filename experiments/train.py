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
(`input_pipeline`). A run that stops is resumed from the newest checkpoint
in `--workdir` that verifies (`checkpoints`): params, optimiser state, step,
RNG and data position. The steps themselves live in `steps`; every default
lives in the config (`configs/common.py`).
"""

import functools
import logging as std_logging
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

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
import tqdm

import irpe_jax
from experiments import checkpoints
from experiments import cli
from experiments import config_checks
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import optim
from experiments import steps
from experiments.configs import common
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
LOG_LEVELS = cli.LOG_LEVELS
_LOG_LEVEL = flags.DEFINE_enum(
    'log_level', 'info', LOG_LEVELS, "Lowest level of this program's log "
    'lines. The libraries (jax, orbax, grain, tfds, absl) log only warnings '
    'and errors, or everything at debug.')

# Log records from files under this folder are the program's own; all
# others are the libraries'.
_OWN_CODE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _TqdmHandler(std_logging.Handler):
  """One line per record, written above the progress bar (`tqdm.write`)."""

  def emit(self, record: std_logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def configure_logging(level: str = 'info') -> std_logging.Handler:
  """Routes all log records through one filtered, bar-safe handler.

  The program's own records (from `experiments/`) show from `level` on;
  the libraries' (orbax, jax, grain, tfds, absl) from warning on, or all
  of them at 'debug'. Each record is one `HH:MM:SS LEVEL message` line
  written with `tqdm.write`, so a progress bar stays whole below it.

  Args:
    level: one of `LOG_LEVELS`.

  Returns:
    The installed handler (the root logger's only one).
  """
  if level not in LOG_LEVELS:
    raise ValueError(f'log level {level!r}; expected one of {LOG_LEVELS}.')
  own = getattr(std_logging, level.upper())
  others = std_logging.DEBUG if level == 'debug' else max(own,
                                                          std_logging.WARNING)

  def keep(record: std_logging.LogRecord) -> bool:
    mine = os.path.abspath(record.pathname).startswith(_OWN_CODE)
    return record.levelno >= (own if mine else others)

  handler = _TqdmHandler()
  handler.addFilter(keep)
  handler.setFormatter(std_logging.Formatter(
      '%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S'))
  root = std_logging.getLogger()
  for old in list(root.handlers):
    root.removeHandler(old)
  root.addHandler(handler)
  root.setLevel(min(own, others))
  # absl's logger (orbax, grain and this program log through it) passes
  # everything to the handler, which decides.
  logging.set_verbosity(min(own, others))
  std_logging.captureWarnings(True)
  return handler


load_config = cli.load_config


def usage_with_config_keys(argv: List[str]) -> str:
  """This docstring, then every config key with its value and meaning.

  The values are those of `--config` when it is given, else the DeiT
  recipe's defaults (`configs/common.py`), which every config starts from.
  """
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      spec = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
  config, source = common.deit_recipe(), 'experiments/configs/common.py'
  if spec:
    try:
      config, source = load_config(spec), spec
    except Exception as e:  # pylint: disable=broad-except
      source = f'common.py (--config {spec} did not load: {e})'
  keys = common.describe(config).replace('%', '%%')
  return (__doc__.replace('%', '%%') + '\nConfig keys (override with '
          f'--config.KEY=VALUE; values of {source}):\n{keys}\n')

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


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Places host values, equal on every process, replicated on `sharding`."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree)


@functools.lru_cache(maxsize=8)
def compiled_steps(model: Any, recipe: steps.Recipe, mesh: Mesh) -> Tuple[
    Any, Any]:
  """`(train_step, eval_step)` jitted for `mesh`: batch sharded, rest replicated.

  Cached on its (hashable) arguments, so that several runs in one process
  (tests, sweeps) compile each step once.
  """
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  train_step = jax.jit(
      functools.partial(steps.train_step, model=model, recipe=recipe),
      donate_argnums=0, in_shardings=(replicated, data),
      out_shardings=(replicated, replicated))
  eval_step = jax.jit(functools.partial(steps.eval_step, model=model),
                      in_shardings=(replicated, data),
                      out_shardings=replicated)
  return train_step, eval_step


def global_batch(local: Dict[str, np.ndarray],
                 sharding: NamedSharding) -> Dict[str, jax.Array]:
  """This host's part of a batch, as one array over all hosts' devices."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def evaluate(eval_step: Any, params: Any,
             batches: Iterable[Dict[str, np.ndarray]],
             sharding: NamedSharding) -> Dict[str, float]:
  """Mean eval loss, top-1 and top-5 over all batches (padding masked)."""
  sums = None
  for batch in batches:
    out = eval_step(params, global_batch(batch, sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = max(float(sums.pop('count')), 1.0)
  return {k: float(v) / count for k, v in sums.items()}


def is_time(step: int, every: int, total_steps: int) -> bool:
  """Whether to log / evaluate / save at `step`: every `every` and the last."""
  return step == total_steps or (every > 0 and step % every == 0)


def check_nonfinite(state: Any, seen: int, since_step: int, step: int,
                    policy: str, last_checkpoint: Optional[int]) -> int:
  """Acts on steps refused for a non-finite loss since the last check.

  Returns:
    The running count of refused steps.

  Raises:
    FloatingPointError: with `policy == 'stop'`, if there was one.
  """
  count = int(jax.device_get(state['nonfinite_steps']))
  if count == seen:
    return count
  where = (f'step {step}' if since_step + 1 == step else
           f'{count - seen} step(s) between step {since_step + 1} and step '
           f'{step}')
  if policy == 'skip':
    logging.warning('Non-finite loss or gradients in %s: those updates were '
                    'skipped (%d in this run so far).', where, count)
    return count
  saved = ('no checkpoint was saved yet' if last_checkpoint is None else
           f'the last checkpoint is step {last_checkpoint}')
  raise FloatingPointError(
      f'Non-finite loss or gradients in {where}. No such update was applied '
      f'and nothing after it was saved; {saved}. Stopping, as '
      "config.nonfinite_policy is 'stop': lower optim.base_lr or set "
      "optim.grad_clip_norm and resume, or set nonfinite_policy='skip' to "
      'skip such steps and go on.')


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
  # Before any data is read or any step compiled.
  config_checks.check_deit_config(config)
  checkpoints.check_writable(workdir)

  # --- Devices, data, model -------------------------------------------------
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  for name in ('batch_size', 'eval_batch_size'):
    if config.input[name] % jax.device_count():
      raise ValueError(f'config.input.{name}={config.input[name]} must '
                       f'divide by the {jax.device_count()} devices.')
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
  state = replicate(
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
    state = replicate(steps.init_state(params, recipe,
                                       jax.random.fold_in(rng, 1)),
                      replicated)
  start_step = int(state['step'])
  logging.info('Starting at step %d of %d.', start_step, total_steps)

  # --- Loop -----------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir, total_steps, start_step,
                                    config.progress_bar)
  # The data stream is a function of (seed, step): it resumes exactly.
  batches = input_pipeline.train_iterator(
      train_source, config.input, start_step, total_steps, config.seed)
  eval_metrics = None
  nonfinite_seen, checked_at = int(state['nonfinite_steps']), start_step
  timer_start, timer_step = time.time(), start_step
  step = start_step
  try:
    for step, batch in zip(range(start_step + 1, total_steps + 1), batches):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, train_metrics = train_step(state,
                                          global_batch(batch, data_sharding))
      writer.advance(step)
      log = is_time(step, config.log_every_steps, total_steps)
      evaluate_now = is_time(step, config.eval_every_steps, total_steps)
      save = (is_time(step, config.checkpoint_every_steps, total_steps)
              or step == stop_at_step)
      if log or evaluate_now or save:
        nonfinite_seen = check_nonfinite(
            state, nonfinite_seen, checked_at, step, config.nonfinite_policy,
            ckpt.latest_step())
        checked_at = step
      if log:
        host_metrics = jax.device_get(train_metrics)
        rate = (step - timer_step) / max(time.time() - timer_start, 1e-9)
        writer.write(step, {k: float(v) for k, v in host_metrics.items()} | {
            'steps_per_sec': rate,
            'images_per_sec': rate * config.input.batch_size}, 'train')
        timer_start, timer_step = time.time(), step
      paused = time.time()
      # Saved before the evaluation: an evaluation that stops (unreadable
      # eval data) must not cost the step's state.
      if save:
        ckpt.save(step, state)
      if evaluate_now:
        eval_metrics = evaluate(
            eval_step, state['params'],
            input_pipeline.eval_batches(eval_source, config.input),
            data_sharding)
        writer.write(step, eval_metrics, 'eval')
        ckpt.save_best(step, state['params'], eval_metrics)
      timer_start += time.time() - paused  # the rate counts training only.
      if step == stop_at_step:
        break
  finally:
    ckpt.close()
    writer.close()
  return {'step': step, 'params': jax.device_get(state['params']),
          'eval': eval_metrics}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  configure_logging(_LOG_LEVEL.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info('Process %d of %d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  # An expected error (a bad config value, damaged data or checkpoints, a
  # non-finite run) is one line, its traceback kept for --log_level=debug
  # (`cli.run_with_config`).
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  # `--help` prints the main module's docstring: add the config keys to it.
  sys.modules['__main__'].__doc__ = usage_with_config_keys(sys.argv)
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run_with_config(main)
