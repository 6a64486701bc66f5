"""Training metrics to the console, `metrics.jsonl` and TensorBoard."""

import json
import os
import time
from typing import Dict, Optional

from absl import logging
import jax
import tqdm


def drop_rows_after(path: str, step: int) -> int:
  """Removes the rows of a metrics.jsonl past `step`, which a resume replays.

  A run killed between two checkpoints has logged steps that the resumed run
  logs again; without this the file would hold two rows for each. A line
  cut short by the kill is removed too. The file is replaced atomically.

  Args:
    path: a metrics.jsonl; need not exist.
    step: the step the run resumes from (0: a fresh start).

  Returns:
    The number of rows removed.
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and record.get('step', step + 1) <= step:
      kept.append(line)
  if len(kept) == len(lines):
    return 0
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.writelines(line + '\n' for line in kept)
  os.replace(tmp, path)
  return len(lines) - len(kept)


class MetricWriter:
  """Metrics to the console, `metrics.jsonl` and TensorBoard (process 0).

  On a terminal a tqdm progress bar shows the step, its rate and the ETA,
  and metric lines print above it; elsewhere (a log file, CI) the bar is
  off. Train metric lines carry the rate and the ETA either way. A run
  resumed at `start_step` first removes what an earlier attempt logged past
  it, so that every step has one row.
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
      path = os.path.join(workdir, 'metrics.jsonl')
      dropped = drop_rows_after(path, start_step)
      if dropped:
        logging.info('Removed %d rows past step %d from %s: this run logs '
                     'those steps again.', dropped, start_step, path)
      self.jsonl = open(path, 'a')
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        # purge_step hides the events an earlier attempt wrote past the
        # step this run resumes from.
        self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'),
                                             purge_step=start_step + 1)
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard logs.')

  def write(self, step: int, metrics: Dict[str, float], prefix: str) -> None:
    """Logs `metrics` of `step` as `prefix/name`."""
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
