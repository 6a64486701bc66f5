r"""Trains and evaluates DeiT with iRPE, from one CPU to a TPU pod.

  python -m experiments.deit.train \
      --config experiments/deit/configs/deit_imagenet.py:small_k \
      --workdir /tmp/deit_s_irpe_k [--config.input.batch_size=256]

One program for every scale: all devices of all hosts form one mesh, the
batch is sharded over them and the parameters are replicated. On a
multi-host TPU pod run the same command on every host with `--distributed`
(`jax.distributed.initialize()` finds the others), or pass
`--coordinator_address`, `--num_processes`, `--process_id`. A run that stops
resumes from the newest checkpoint in `--workdir` that verifies.

This command is only its flags; the program is `experiments.deit.trainer`,
over the loop DETR shares (`experiments.lib.loop`).
"""

import sys
from typing import List

from absl import app
from absl import flags

from experiments.deit.configs import common
from experiments.deit import trainer
from experiments.lib import cli


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
  config = common.deit_recipe()
  source = 'experiments/deit/configs/common.py'
  if spec:
    try:
      config, source = cli.load_config(spec), spec
    except Exception as e:  # pylint: disable=broad-except
      source = f'common.py (--config {spec} did not load: {e})'
  keys = common.describe(config).replace('%', '%%')
  return (__doc__.replace('%', '%%') + '\nConfig keys (override with '
          f'--config.KEY=VALUE; values of {source}):\n{keys}\n')


def main(argv: List[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  cli.initialize_from_flags()
  # An expected error (a bad config value, damaged data or checkpoints, a
  # non-finite run) is one line, its traceback kept for --log_level=debug
  # (`cli.run_with_config`).
  trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  cli.define_run_flags('Training configuration (a Python file with '
                       'get_config).')
  flags.adopt_module_key_flags(cli)  # --help lists them.
  # `--help` prints the main module's docstring: add the config keys to it.
  sys.modules['__main__'].__doc__ = usage_with_config_keys(sys.argv)
  cli.run_with_config(main)
