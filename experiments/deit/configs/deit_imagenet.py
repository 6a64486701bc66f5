r"""DeiT-Ti/S/B with or without iRPE on ImageNet-1k (the paper's Table 5).

  python -m experiments.deit.train \
      --config experiments/deit/configs/deit_imagenet.py:small_k --workdir DIR

The argument is `SIZE_ON`: SIZE in tiny, small, base; ON in none (plain
DeiT), k, qk, qkv (contextual product iRPE, shared heads, the released
models). ImageNet must be prepared for tfds from the manual download first
(`--config.data_dir`).
"""

import ml_collections

from experiments.deit.configs import common


def get_config(arg: str = 'small_k') -> ml_collections.ConfigDict:
  size, _, rpe_on = arg.partition('_')
  if size not in common.SIZES or rpe_on not in ('none', 'k', 'qk', 'qkv'):
    raise ValueError(f"Config argument must be SIZE_ON with SIZE in "
                     f"{sorted(common.SIZES)} and ON in none, k, qk, qkv; got "
                     f"{arg!r}.")
  config = common.deit_recipe()
  config.model_name = common.model_name(size, rpe_on)
  # DeiT's drop path: 0.1 for S and B, none for Ti.
  config.model.drop_path_rate = 0.0 if size == 'tiny' else 0.1
  return config
