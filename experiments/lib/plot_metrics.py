r"""Plots the metrics.jsonl of training runs side by side.

  python -m experiments.lib.plot_metrics WORKDIR [WORKDIR ...] --out curves.png

One line per workdir (labelled by its folder name) in three panels: training
loss, eval top-1 and the learning rate, against the step.
"""

import json
import os
import sys
from typing import Dict, List, Sequence

from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from experiments.lib import cli

PANELS = (('train/loss', 'training loss'), ('eval/top1', 'eval top-1'),
          ('train/lr', 'learning rate'))


def read_metrics(workdir: str) -> Dict[str, List[List[float]]]:
  """`{metric: [steps, values]}` of a workdir's metrics.jsonl.

  A resumed run first drops the rows past its checkpoint, so each step has
  one row; should a file still hold two, the later one wins.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise ValueError(f'{workdir} has no metrics.jsonl.')
  series: Dict[str, Dict[int, float]] = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      for key, value in record.items():
        if key != 'step':
          series.setdefault(key, {})[record['step']] = value
  return {k: [sorted(v), [v[s] for s in sorted(v)]] for k, v in series.items()}


def plot(workdirs: Sequence[str], out: str) -> None:
  """Writes the three panels for `workdirs` to the PNG `out`."""
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
  for workdir in workdirs:
    metrics = read_metrics(workdir)
    label = os.path.basename(os.path.normpath(workdir))
    for ax, (key, _) in zip(axes, PANELS):
      if key in metrics:
        ax.plot(*metrics[key], label=label, marker='.' if key.startswith(
            'eval') else None)
  for ax, (_, title) in zip(axes, PANELS):
    ax.set(xlabel='step', title=title)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


COMMAND = cli.Command(
    'python -m experiments.lib.plot_metrics', __doc__,
    positional=(('workdirs', '+'),))
flags.DEFINE_string('out', 'curves.png', '', flag_values=COMMAND.flags)


def main(argv: Sequence[str]) -> None:
  args = COMMAND.namespace(argv)
  plot(args.workdirs, args.out)
  print(f'Wrote {os.path.abspath(args.out)}')


if __name__ == '__main__':
  main(sys.argv[1:])
