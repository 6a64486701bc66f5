r"""Trains and evaluates DETR with iRPE: the release's recipe, on JAX.

  python -m experiments.detr.train \
      --config experiments/detr/configs/coco.py:rpe-2.0-product-ctx-1-k \
      --workdir /tmp/detr_irpe --config.data.root /data/coco

On a multi-host pod run the same command on every host with
`--distributed` (or `--coordinator_address`, `--num_processes`,
`--process_id`): `jax.distributed.initialize()` joins them into one run
whose parameters are those of a one-host run. A run that stops resumes from
the newest checkpoint in `--workdir` that verifies; `best/` keeps the
variables of the best AP.

This command is only its flags; the program is `experiments.detr.trainer`,
over the loop DeiT shares (`experiments.lib.loop`).
"""

from typing import List

from absl import app
from absl import flags

from experiments.detr import trainer
from experiments.lib import cli


def main(argv: List[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  cli.initialize_from_flags()
  trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  cli.define_run_flags('DETR config (experiments/detr/configs/*.py[:ARG]).')
  flags.adopt_module_key_flags(cli)  # --help lists them.
  # One line for an expected error; a traceback with --log_level=debug.
  cli.run_with_config(main)
