r"""A small run for a laptop CPU: a tiny iRPE ViT on CIFAR-10 at 32px.

  python -m experiments.deit.train --workdir /tmp/tiny \
      --config experiments/deit/configs/cifar10_tiny.py

Any tfds image dataset (`--config.dataset=mnist`) or image folder
(`--config.dataset=folder:PATH`, with PATH/train and PATH/test) works too.
The tests run this config on mock data with even smaller shapes.
"""

import ml_collections

from experiments.deit.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = common.deit_recipe()
  config.dataset = 'cifar10'
  config.eval_split = 'test'
  config.input.batch_size = 128
  config.input.eval_batch_size = 500
  config.input.image_size = 32
  config.input.crop_scale = (0.35, 1.0)
  config.input.crop_fraction = 1.0
  config.input.randaugment_ops = 2
  config.input.random_erasing = 0.25
  config.input.num_threads = 4
  config.model = ml_collections.ConfigDict({
      'patch_size': 4, 'embed_dim': 192, 'depth': 6, 'num_heads': 3,
      'mlp_ratio': 2.0, 'drop_path_rate': 0.1})
  config.rpe = {'ratio': 1.9, 'method': 'product', 'mode': 'ctx',
                'shared_head': True, 'skip': 1, 'rpe_on': 'k'}
  config.optim.base_lr = 1e-3
  config.optim.warmup_epochs = 2
  config.num_epochs = 30
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  return config
