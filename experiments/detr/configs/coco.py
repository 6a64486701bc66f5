r"""DETR (ResNet-50) on COCO 2017 with the release's recipe, plain or with iRPE.

  python -m experiments.detr.train \
      --config experiments/detr/configs/coco.py:rpe-2.0-product-ctx-1-k \
      --workdir /tmp/detr_irpe --config.data.root /data/coco

`ARG` is the release's `--enc_rpe2d` string: 'plain' (no iRPE),
'rpe-1.9-product-ctx-1-k' (7x7 buckets, 40.9 AP at 150 epochs) or
'rpe-2.0-product-ctx-1-k' (9x9, 41.0 AP; 42.2 at 300 epochs); plain DETR
gives 39.5. `data.root` is COCO as downloaded: `train2017/`, `val2017/`,
`annotations/instances_{train,val}2017.json`. Or COCO as tfds prepares it
(`tfds build coco/2017 --data_dir /data/tfds`):

  python -m experiments.detr.train \
      --config experiments/detr/configs/coco.py:rpe-2.0-product-ctx-1-k \
      --workdir /tmp/detr_irpe --config.data.source=tfds \
      --config.data.tfds_dir=/data/tfds

(the validation ground truth is then written once to
`WORKDIR/coco_gt/coco_2017_validation.json` for pycocotools).
"""

import ml_collections

RELEASED = ('plain', 'rpe-1.9-product-ctx-1-k', 'rpe-2.0-product-ctx-1-k')
COCO_TRAIN_IMAGES = 118287


def get_config(arg: str = 'rpe-2.0-product-ctx-1-k'
               ) -> ml_collections.ConfigDict:
  """The release's recipe: 150 epochs, lr drop at 100, batch 2 x 8 GPUs."""
  if arg not in RELEASED and not arg.startswith('rpe-'):
    raise ValueError(f'config arg {arg!r}: expected one of {RELEASED} or an '
                     "'rpe-RATIO-METHOD-MODE-SHARED-ON' string.")
  config = ml_collections.ConfigDict()
  config.seed = 42
  config.data = ml_collections.ConfigDict({
      # 'folder': COCO-format files under `root`; 'tfds': `tfds_name`.
      'source': 'folder',
      'root': ml_collections.config_dict.placeholder(str),
      'train_images': 'train2017',
      'train_annotations': 'annotations/instances_train2017.json',
      'eval_images': 'val2017',
      'eval_annotations': 'annotations/instances_val2017.json',
      'tfds_name': 'coco/2017',
      'tfds_dir': ml_collections.config_dict.placeholder(str),  # tfds'.
      'train_split': 'train',
      'eval_split': 'validation',
  })
  config.input = ml_collections.ConfigDict({
      'batch_size': 16,
      'eval_batch_size': 16,
      # DETR's RandomResize of the shorter side, then max 1333.
      'scales': tuple(range(480, 801, 32)),
      'max_size': 1333,
      'eval_size': 800,
      'flip': True,
      # Half the images: resize to 400-600, RandomSizeCrop(384, 600), then
      # the multi-scale resize (the release's train transform).
      'crop': True,
      'crop_scales': (400, 500, 600),
      'crop_size': (384, 600),
      # Batches decoded ahead in host threads (0: in the training loop).
      'num_threads': 4,
      # Padded batch sides: at most len(pad_sides) ** 2 compiled steps.
      'pad_sides': (512, 640, 800, 1024, 1344),
      # Landscape images batched with landscape ones, portrait with
      # portrait (Detectron2's aspect-ratio grouping): less padding.
      'group_by_orientation': True,
      'max_objects': 100,            # <= num_queries; COCO's most is 93.
  })
  config.model = ml_collections.ConfigDict({
      'num_classes': 91, 'num_queries': 100,
      'enc_rpe2d': '' if arg == 'plain' else arg,
      'hidden_dim': 256, 'num_heads': 8, 'enc_layers': 6, 'dec_layers': 6,
      'dim_feedforward': 2048, 'dropout_rate': 0.1, 'backbone': 'resnet50',
      'backbone_width': 64, 'dilation': False,   # True: DETR-DC5.
      'rpe_table_init': 'xavier_uniform', 'remat': False,
      # Flash attention with the iRPE terms in each block: at 800 x 1333
      # the encoder has about 1,050 tokens (4,200 with DC5), where the
      # materialised (B, H, L, L) maps of six layers would be kept.
      'attention_impl': 'blockwise',
  })
  # torchvision's ImageNet ResNet-50 `.pth` for the backbone ('' = random).
  config.backbone_init = ''
  config.optim = ml_collections.ConfigDict({
      'lr': 1e-4, 'backbone_lr': 1e-5, 'weight_decay': 1e-4,
      'grad_clip_norm': 0.1, 'lr_drop_epoch': 100,
      'freeze_stem': True,   # the release's frozen stem and layer1.
  })
  config.num_epochs = 150
  config.num_train_examples = COCO_TRAIN_IMAGES  # for epochs -> steps.
  config.total_steps = 0                         # > 0 overrides num_epochs.
  config.log_every_steps = 100
  config.progress_bar = ml_collections.config_dict.placeholder(bool)
  config.eval_every_steps = 7393 * 10            # every 10 epochs.
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.async_checkpoints = False
  config.nonfinite_policy = 'stop'
  return config
