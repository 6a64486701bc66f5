"""Runs a few tiny training steps for tests/test_train.py in a fresh process.

The number of CPU devices has to be fixed before jax is imported, so runs on
other device counts, and the processes of a multi-process run, execute this
file as a subprocess:

  python tests/train_worker.py --folder DIR --workdir DIR --out FILE.npz \
      [--devices N] [--coordinator HOST:PORT --num_processes N --process_id I]
"""

import argparse
import os
import sys


def tiny_config(dataset: str):
  """The demo config shrunk to a few seconds of CPU: 16px, one block."""
  # pylint: disable-next=g-import-not-at-top
  from experiments.deit.configs import cifar10_tiny
  config = cifar10_tiny.get_config()
  config.dataset = dataset
  config.input.batch_size = 8
  config.input.eval_batch_size = 8
  config.input.image_size = 16
  config.input.num_threads = 2
  # No qkv bias: the key bias has an exactly zero gradient (softmax ignores
  # a per-row constant), so Adam would turn its rounding noise into lr-sized
  # steps that differ with the device count.
  config.model.update(patch_size=4, embed_dim=16, depth=1, num_heads=2,
                      drop_path_rate=0.1, qkv_bias=False)
  config.rpe = {'ratio': 1.9, 'method': 'product', 'mode': 'ctx',
                'shared_head': True, 'skip': 1, 'rpe_on': 'qkv'}
  config.optim.base_lr = 0.05  # large enough for params to move visibly.
  config.warmup_steps = 1
  config.total_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  return config


def flat_params(params):
  """`{'a/b/kernel': array}` for np.savez."""
  import flax  # pylint: disable=g-import-not-at-top
  return {'/'.join(k): v for k, v in
          flax.traverse_util.flatten_dict(params).items()}


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--folder', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--devices', type=int, default=1)
  parser.add_argument('--coordinator')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args(argv)
  os.environ['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count={args.devices}')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if args.coordinator:
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id)
  from experiments.deit import trainer  # pylint: disable=g-import-not-at-top
  out = trainer.train_and_evaluate(tiny_config('folder:' + args.folder),
                                 args.workdir)
  np.savez(args.out, **flat_params(out['params']),
           **{f'eval/{k}': v for k, v in out['eval'].items()},
           device_count=jax.device_count(),
           process_count=jax.process_count())


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  main(sys.argv[1:])
