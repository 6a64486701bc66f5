r"""Fine-tunes a converted DeiT-iRPE checkpoint on CIFAR-10 or CIFAR-100.

  python -m irpe_jax.convert deit_small_..._k.pth deit_s_k.msgpack
  python -m experiments.deit.train --workdir DIR \
      --config experiments/deit/configs/cifar_finetune.py:cifar100 \
      --config.init_from=deit_s_k.msgpack

The argument is the tfds dataset, `cifar10` or `cifar100`. Images are
upsampled to 224px as in DeiT's transfer experiments; the head is new, every
other tensor comes from `init_from` (`.pth`, `.npz` or msgpack).
"""

import ml_collections

from experiments.deit.configs import common


def get_config(arg: str = 'cifar10') -> ml_collections.ConfigDict:
  if arg not in ('cifar10', 'cifar100'):
    raise ValueError(f"Config argument must be cifar10 or cifar100, got "
                     f"{arg!r}.")
  config = common.deit_recipe()
  config.dataset = arg
  config.eval_split = 'test'
  config.model_name = common.model_name('small', 'k')
  config.input.batch_size = 512
  config.input.eval_batch_size = 512
  config.input.crop_scale = (0.5, 1.0)      # small images: gentler crops.
  config.input.crop_fraction = 1.0
  config.optim.base_lr = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.warmup_epochs = 2
  config.num_epochs = 100
  config.eval_every_steps = 1000
  return config
