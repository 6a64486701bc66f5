"""The training loop DeiT and DETR both run, and what it stands on.

  initialize_distributed(...)   `jax.distributed.initialize` for pods (once)
  data_mesh()                   all devices of all hosts, one 'data' axis
  jit_steps(mesh, train, eval)  a project's steps jitted over it
  replicate(tree, sharding)     host values, equal on every process, on devices
  global_batch(local, sharding) this host's rows as one global array
  Schedule                      when to log, evaluate and save
  RateTimer                     steps per second of training alone
  check_nonfinite(...)          the `nonfinite_policy` ('stop' or 'skip')
  train_loop(...)               the loop: steps, logs, checkpoints, evals

A project brings its step (jitted over `data_mesh()`), its batches (a
function of `(seed, step)`, so a resume is exact) and its evaluation; the
loop brings the rest, the same for every project: the schedule, the
non-finite policy, the checkpoint of a step saved before its evaluation,
the best checkpoint, and a rate that leaves evaluation and saving out.
"""

import contextlib
import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Set
from typing import Tuple

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from experiments.lib import checkpoints as checkpoints_lib
from experiments.lib import metrics as metrics_lib


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           distributed: bool = False) -> None:
  """Joins a multi-host run, then logs this process's place in it.

  Args:
    coordinator_address: `host:port` of process 0 (then `num_processes`
      and `process_id` too): a cluster JAX does not detect by itself.
    num_processes: processes of the run.
    process_id: index of this process.
    distributed: `jax.distributed.initialize()` with the cluster detected
      (Cloud TPU pods, SLURM); ignored when `coordinator_address` is given.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes,
                               process_id)
  elif distributed:
    jax.distributed.initialize()
  logging.info('Process %d of %d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())


def data_mesh() -> Mesh:
  """Every device of every host on one 'data' axis."""
  return Mesh(np.array(jax.devices()), ('data',))


def shardings(mesh: Mesh) -> Tuple[NamedSharding, NamedSharding]:
  """`(replicated, batch)`: parameters everywhere, batches split on 'data'."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def jit_steps(mesh: Mesh, train_step: Callable[..., Any],
              eval_step: Callable[..., Any]) -> Tuple[Any, Any]:
  """`(train_step, eval_step)` jitted for `mesh`: the batch split over the
  devices, everything else replicated; the train step donates its state.

  Both take `(replicated tree, batch)`: the state, or what evaluation reads.
  """
  replicated, batch = shardings(mesh)
  return (jax.jit(train_step, donate_argnums=0,
                  in_shardings=(replicated, batch),
                  out_shardings=(replicated, replicated)),
          jax.jit(eval_step, in_shardings=(replicated, batch),
                  out_shardings=replicated))


def check_divisible(input_config: Any,
                    names: Tuple[str, ...] = ('batch_size', 'eval_batch_size')
                    ) -> None:
  """Each global batch of `input_config` must split evenly over the devices.

  Raises:
    ValueError: naming the key, its value and the device count.
  """
  for name in names:
    if input_config[name] % jax.device_count():
      raise ValueError(f'config.input.{name}={input_config[name]} must '
                       f'divide by the {jax.device_count()} devices.')


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Places host values, equal on every process, replicated on `sharding`."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree)


def global_batch(local: Dict[str, np.ndarray],
                 sharding: NamedSharding) -> Dict[str, jax.Array]:
  """This host's part of a batch, as one array over all hosts' devices."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def is_time(step: int, every: int, total_steps: int) -> bool:
  """Every `every` steps (0: never) and at the last step."""
  return step == total_steps or (every > 0 and step % every == 0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the loop logs, evaluates and saves.

  Attributes:
    total_steps: the run's last step.
    log_every: log train metrics every this many steps, and at the end.
    eval_every: evaluate every this many steps and at the end; 0 only at
      the end, negative never.
    save_every: save a checkpoint every this many steps, and at the end.
    stop_at_step: save and stop here (as a preempted job would); None
      runs to the end.
  """
  total_steps: int
  log_every: int
  eval_every: int
  save_every: int
  stop_at_step: Optional[int] = None

  @classmethod
  def of(cls, config: Any, total_steps: int,
         stop_at_step: Optional[int] = None) -> 'Schedule':
    """The schedule of a run's config (`*_every_steps`)."""
    return cls(total_steps, config.log_every_steps, config.eval_every_steps,
               config.checkpoint_every_steps, stop_at_step)

  def at(self, step: int) -> Tuple[bool, bool, bool]:
    """`(log, evaluate, save)` at `step`."""
    log = is_time(step, self.log_every, self.total_steps)
    evaluate = self.eval_every >= 0 and is_time(step, self.eval_every,
                                                self.total_steps)
    save = (is_time(step, self.save_every, self.total_steps)
            or step == self.stop_at_step)
    return log, evaluate, save


class RateTimer:
  """Steps per second between two logs, time spent in `paused()` left out.

  Evaluations and checkpoints run inside `paused()`, so the rate (and the
  ETA drawn from it) is the one of training alone.
  """

  def __init__(self, step: int):
    self._start, self._step = time.perf_counter(), step

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    began = time.perf_counter()
    try:
      yield
    finally:
      self._start += time.perf_counter() - began

  def rate(self, step: int) -> float:
    """Steps per second since the last call (or the start); restarts."""
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._start, 1e-9)
    self._start, self._step = now, step
    return rate


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


@dataclasses.dataclass
class LoopResult:
  """What `train_loop` ends with.

  Attributes:
    step: the last step taken.
    state: the state after it (on the devices).
    eval: the metrics of the last evaluation, or None.
    batch_shapes: the distinct shapes of the batches stepped on: the step
      compiled once for each.
  """
  step: int
  state: Any
  eval: Optional[Dict[str, float]]
  batch_shapes: Set[Tuple[Tuple[int, ...], ...]]


def train_loop(*, state: Any, batches: Iterable[Dict[str, np.ndarray]],
               train_step: Callable[[Any, Any], Tuple[Any, Any]],
               sharding: NamedSharding, schedule: Schedule,
               checkpoints: checkpoints_lib.Checkpoints,
               writer: metrics_lib.MetricWriter, nonfinite_policy: str,
               batch_size: int,
               evaluate: Optional[Callable[[Any], Dict[str, float]]] = None,
               best_of: Callable[[Any], Any] = lambda s: s['params']
               ) -> LoopResult:
  """Trains from `state['step']` to the schedule's end (or its stop).

  At each step, in this order: the step; at a log, evaluation or save, the
  non-finite policy (`check_nonfinite`); the train metrics with
  `steps_per_sec` and `images_per_sec` of training alone (`RateTimer`);
  the checkpoint (before the evaluation: an evaluation that stops must not
  cost the step's state); the evaluation, its metrics, and the offer of
  `best_of(state)` as the best checkpoint. The checkpoints and the writer
  are closed at the end, also when a step raises.

  Args:
    state: the replicated state to start from.
    batches: host-local batches of steps `state['step'] + 1` on.
    train_step: `(state, global batch) -> (state, metrics)`, jitted.
    sharding: how a batch lies on the devices.
    schedule: when to log, evaluate and save.
    checkpoints: the run's checkpoints (closed here).
    writer: the run's metric writer (closed here).
    nonfinite_policy: 'stop' or 'skip' (`check_nonfinite`).
    batch_size: images of a global batch, for `images_per_sec`.
    evaluate: `state -> metrics`; None never evaluates.
    best_of: what of the state `best/` keeps (default its params).

  Returns:
    A `LoopResult`.
  """
  start_step = int(jax.device_get(state['step']))
  step, eval_metrics, shapes = start_step, None, set()
  seen, checked_at = int(jax.device_get(state['nonfinite_steps'])), start_step
  timer = RateTimer(start_step)
  try:
    for step, batch in zip(range(start_step + 1, schedule.total_steps + 1),
                           batches):
      shapes.add(tuple(np.shape(v) for _, v in sorted(batch.items())))
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, train_metrics = train_step(state, global_batch(batch, sharding))
      writer.advance(step)
      log, evaluate_now, save = schedule.at(step)
      evaluate_now = evaluate_now and evaluate is not None
      if log or evaluate_now or save:
        seen = check_nonfinite(state, seen, checked_at, step,
                               nonfinite_policy, checkpoints.latest_step())
        checked_at = step
      if log:
        rate = timer.rate(step)
        writer.write(step, {k: float(v) for k, v in jax.device_get(
            train_metrics).items()} | {
                'steps_per_sec': rate, 'images_per_sec': rate * batch_size},
                     'train')
      with timer.paused():
        if save:
          checkpoints.save(step, state)
        if evaluate_now:
          eval_metrics = evaluate(state)
          writer.write(step, eval_metrics, 'eval')
          checkpoints.save_best(step, best_of(state), eval_metrics)
      if step == schedule.stop_at_step:
        break
  finally:
    checkpoints.close()
    writer.close()
  return LoopResult(step, state, eval_metrics, shapes)
