"""The DeiT recipe (Touvron et al. 2021) that the iRPE paper trains with.

Every other config starts from `deit_recipe()` and changes what differs.
"""

from typing import Any, Dict, Iterator, Optional, Tuple

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
  # Unreadable image files (truncated, empty, not an image, decompression
  # bomb) are skipped and logged; more than this share of a split's files
  # stops the run. 0.001 is 1281 of ImageNet's 1.28M training images: far
  # above the few bad files of a real download, an early stop for a
  # broken copy.
  config.input.max_bad_images = 0.001

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


# The meaning of every config key, once:
# `python -m experiments.deit.train --help` lists them with their defaults,
# and a test checks that every key of every shipped config is here.
DESCRIPTIONS: Dict[str, str] = {
    'seed': 'seed of the init, the data order, augmentation and dropout',
    'dataset': "tfds name ('imagenet2012', 'cifar10', 'name/config') or "
               "'folder:PATH' with PATH/SPLIT/CLASS/IMAGE files",
    'data_dir': "tfds data directory (None: tfds' default, "
                '~/tensorflow_datasets)',
    'train_split': "training split ('train', 'train[:90%]', a folder name)",
    'eval_split': "evaluation split (a folder one is labelled by "
                  "train_split's class folders)",
    'num_classes': "classes of the head (None: the dataset's)",
    'input.batch_size': 'global training batch, over all devices and hosts',
    'input.eval_batch_size': 'global eval batch (padded, padding masked)',
    'input.image_size': 'side of the square model input in pixels',
    'input.random_resized_crop': 'train: random resized crop (else resize)',
    'input.crop_scale': 'train: (min, max) area share of the random crop',
    'input.flip': 'train: random horizontal flip',
    'input.randaugment_ops': 'train: RandAugment ops per image (0: off)',
    'input.randaugment_magnitude': 'train: RandAugment magnitude (0-10)',
    'input.randaugment_magnitude_std': 'train: std of the magnitude noise',
    'input.random_erasing': 'train: random erasing probability (0: off)',
    'input.crop_fraction': 'eval: resize to image_size / crop_fraction, '
                           'centre crop image_size',
    'input.num_threads': 'image decoding and augmentation threads per host',
    'input.prefetch': 'batches prepared ahead per host',
    'input.max_bad_images': "share of a split's image files (0-1) that may "
                            'be unreadable: each is skipped and logged, '
                            'more stop the run',
    'mixup_alpha': 'Beta parameter of mixup (0: off)',
    'cutmix_alpha': 'Beta parameter of cutmix (0: off)',
    'mixup_switch_prob': 'probability of cutmix when both are on',
    'label_smoothing': 'label smoothing of the targets',
    'model_name': 'registered model (irpe_jax.models.list_models()); None: '
                  'a VisionTransformer of the model fields',
    'model': 'VisionTransformer fields, overriding the registered model',
    'model.drop_path_rate': 'stochastic depth rate of the last block',
    'model.patch_size': 'side of the square patches in pixels',
    'model.embed_dim': 'token width',
    'model.depth': 'number of blocks',
    'model.num_heads': 'attention heads per block',
    'model.mlp_ratio': 'MLP hidden width / embed_dim',
    'model.qkv_bias': 'biases on the q, k, v projections',
    'model.use_abs_pos_embed': 'learnable absolute position embedding',
    'model.attention_impl': "'materialized', 'blockwise' (flash, O(L) "
                            "memory) or 'auto' (by length and platform)",
    'rpe': 'irpe_jax.get_rpe_config keywords (None: no iRPE, or the '
           "registered model's)",
    'rpe.ratio': 'iRPE ratio: alpha, beta, gamma = r, 2r, 8r',
    'rpe.method': "iRPE bucketing: 'euc', 'quant', 'cross', 'product'",
    'rpe.mode': "iRPE mode: 'bias' or 'ctx' (contextual)",
    'rpe.shared_head': 'one iRPE table for all heads',
    'rpe.skip': 'leading tokens without position (1: the class token)',
    'rpe.rpe_on': "where iRPE goes: 'q', 'k', 'v' or a combination",
    'rpe.index_fn': "index function g: 'piecewise' or 'clip' (Table 3)",
    'dtype': "compute dtype: 'float32', or 'bfloat16' (fp32 parameters)",
    'init_from': 'fine-tune from this .pth/.npz/msgpack (heads dropped, '
                 "pos_embed resampled); '': from scratch",
    'optim.base_lr': 'peak learning rate per reference_batch images',
    'optim.reference_batch': 'the lr scales linearly with batch_size / this',
    'optim.weight_decay': 'AdamW weight decay (not on biases, norms, '
                          'tokens, position embeddings, iRPE tables)',
    'optim.warmup_epochs': 'linear warm-up length in epochs',
    'optim.warmup_lr': 'learning rate at step 0',
    'optim.min_lr': 'learning rate at the end of the cosine',
    'optim.grad_clip_norm': 'clip the global gradient norm (0: off)',
    'num_epochs': 'training length in epochs',
    'total_steps': 'training length in steps; > 0 overrides num_epochs',
    'warmup_steps': 'warm-up in steps; overrides warmup_epochs if set',
    'log_every_steps': 'a train metrics line every this many steps',
    'progress_bar': 'True/False forces the progress bar; None: on a '
                    'terminal only',
    'eval_every_steps': 'evaluate (and offer best/) every this many steps',
    'checkpoint_every_steps': 'save a checkpoint every this many steps',
    'keep_checkpoints': 'how many of the latest checkpoints to keep',
    'async_checkpoints': 'save while training goes on',
    'nonfinite_policy': "a non-finite loss or gradient is never applied; "
                        "'stop' ends the run at the next log/eval/save, "
                        "'skip' goes on and counts them",
}


def flat_items(config: Any, prefix: str = '') -> Iterator[Tuple[str, Any]]:
  """`(dotted key, value)` of every leaf of a config, dicts opened."""
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from flat_items(value, name + '.')
    else:
      yield name, value


def describe(config: ml_collections.ConfigDict) -> str:
  """Every key of `config` with its value and meaning, one per line."""
  lines = []
  for key, value in flat_items(config):
    lines.append(f'  {key + " = " + repr(value):44s} '
                 f'{DESCRIPTIONS.get(key, "?")}')
  return '\n'.join(lines)
