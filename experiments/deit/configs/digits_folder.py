r"""Offline training end to end: scikit-learn's digits as an image folder.

  python -m experiments.deit.make_digits_folder /tmp/digits
  python -m experiments.deit.train \
      --config experiments/deit/configs/digits_folder.py \
      --config.dataset=folder:/tmp/digits --workdir /tmp/digits_run

A small iRPE ViT (contextual product iRPE on keys) on 32x32 digits cut into
an 8x8 grid of 4x4 patches (one digit pixel each): 420 steps, about
2.5 minutes of CPU time (61.6% test top-1 with seed 0; still rising). The whole
training path runs as for ImageNet (folder source, grain, augmentation,
sharded steps, checkpoints, eval), with augmentations that suit digits: no
flips, gentle crops, no RandAugment or random erasing.
"""

import ml_collections

from experiments.deit.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = common.deit_recipe()
  config.dataset = 'folder:/tmp/digits'
  config.eval_split = 'test'
  config.input.batch_size = 64
  config.input.eval_batch_size = 150
  config.input.image_size = 32
  config.input.crop_scale = (0.85, 1.0)
  config.input.crop_fraction = 1.0
  config.input.flip = False                 # a flipped 2 is no 2.
  config.input.randaugment_ops = 0
  config.input.random_erasing = 0.0
  config.input.num_threads = 2
  config.mixup_alpha = 0.0
  config.label_smoothing = 0.0
  config.cutmix_alpha = 0.0
  config.model = ml_collections.ConfigDict({
      'patch_size': 4, 'embed_dim': 48, 'depth': 4, 'num_heads': 3,
      'mlp_ratio': 2.0, 'drop_path_rate': 0.0})
  config.rpe = {'ratio': 1.9, 'method': 'product', 'mode': 'ctx',
                'shared_head': True, 'skip': 1, 'rpe_on': 'k'}
  config.optim.base_lr = 3e-3
  config.optim.reference_batch = 64         # 3e-3 at this batch.
  config.optim.weight_decay = 0.05
  config.optim.warmup_epochs = 1
  config.num_epochs = 20
  config.log_every_steps = 105
  config.eval_every_steps = 210
  config.checkpoint_every_steps = 210
  return config
