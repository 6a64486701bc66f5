"""The DeiT recipe (Touvron et al. 2021) that the iRPE paper trains with.

Every other config starts from `deit_recipe()` and changes what differs.
"""

from typing import Optional

import ml_collections

# Sizes of DeiT: every one has 12 blocks and 16x16 patches.
SIZES = {'tiny': 'deit_tiny_patch16_224', 'small': 'deit_small_patch16_224',
         'base': 'deit_base_patch16_224'}


def deit_recipe() -> ml_collections.ConfigDict:
  """ImageNet-1k, 224px, 300 epochs, AdamW 5e-4 per 512, DeiT augmentations."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = 'imagenet2012'
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.num_classes = ml_collections.config_dict.placeholder(int)

  config.input = ml_collections.ConfigDict()
  config.input.batch_size = 1024
  config.input.eval_batch_size = 1024
  config.input.image_size = 224
  config.input.random_resized_crop = True
  config.input.crop_scale = (0.08, 1.0)
  config.input.flip = True
  config.input.randaugment_ops = 2          # rand-m9-mstd0.5-inc1
  config.input.randaugment_magnitude = 9.0
  config.input.randaugment_magnitude_std = 0.5
  config.input.random_erasing = 0.25
  config.input.crop_fraction = 0.875        # eval: resize 256, crop 224.
  config.input.num_threads = 32
  config.input.prefetch = 4

  config.mixup_alpha = 0.8
  config.cutmix_alpha = 1.0
  config.mixup_switch_prob = 0.5
  config.label_smoothing = 0.1

  config.model_name = ml_collections.config_dict.placeholder(str)
  config.model = ml_collections.ConfigDict({'drop_path_rate': 0.1})
  config.rpe = ml_collections.config_dict.placeholder(dict)
  config.dtype = 'float32'                  # 'bfloat16': bf16 compute.
  config.init_from = ''

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 5e-4               # per 512 images (linear scaling).
  config.optim.reference_batch = 512
  config.optim.weight_decay = 0.05
  config.optim.warmup_epochs = 5
  config.optim.warmup_lr = 1e-6
  config.optim.min_lr = 1e-5
  config.optim.grad_clip_norm = 0.0         # 0: no clipping (as DeiT).

  config.num_epochs = 300
  config.total_steps = 0                    # > 0 overrides num_epochs.
  config.warmup_steps = ml_collections.config_dict.placeholder(int)
  config.log_every_steps = 100
  # Progress bar: True/False forces it; None shows it on a terminal only.
  config.progress_bar = ml_collections.config_dict.placeholder(bool)
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.async_checkpoints = False       # True: save while training goes on.
  # A step whose loss or gradients are not finite is never applied; 'stop'
  # ends the run at the next log/eval/save step, 'skip' goes on and counts
  # them (train/nonfinite_steps).
  config.nonfinite_policy = 'stop'
  return config


def model_name(size: str, rpe_on: Optional[str]) -> str:
  """Registered name of DeiT-`size` with contextual product iRPE on `rpe_on`."""
  base = SIZES[size]
  if not rpe_on or rpe_on == 'none':
    return base
  return f'{base}_ctx_product_50_shared_{rpe_on}'
