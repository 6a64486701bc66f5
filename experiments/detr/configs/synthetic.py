r"""A small DETR on the offline digits set (`make_synthetic_coco`).

  python -m experiments.detr.make_synthetic_coco /tmp/digits_coco
  python -m experiments.detr.pretrain_backbone /tmp/digits_backbone.msgpack
  python -m experiments.detr.train \
      --config experiments/detr/configs/synthetic.py:rpe-2.0-product-ctx-1-k \
      --workdir /tmp/detr_digits --config.data.root /tmp/digits_coco \
      --config.backbone_init /tmp/digits_backbone.msgpack

`ARG` as in `coco.py` ('plain' for no iRPE). A narrow ResNet-14 (one
bottleneck per stage, width 16), pretrained on digits first
(`pretrain_backbone`, as the release starts from ImageNet), a few
hidden units, two encoder and decoder layers and 10 queries, the last
ResNet stage dilated (DC5) so that a 128 px canvas gives 8x8 encoder
tokens: minutes on a CPU.
"""

from experiments.detr.configs import coco


def get_config(arg: str = 'rpe-2.0-product-ctx-1-k'):
  config = coco.get_config(arg)
  config.seed = 0
  config.data.update({
      'train_images': 'train', 'eval_images': 'val',
      'train_annotations': 'annotations/instances_train.json',
      'eval_annotations': 'annotations/instances_val.json'})
  config.input.update({
      'batch_size': 8, 'eval_batch_size': 16,
      'scales': (), 'eval_size': None,      # canvases at their own size.
      'flip': False,                        # a mirrored digit is no digit.
      'crop': False,                        # COCO's crop sizes: 384-600 px.
      # Every canvas padded to 128 px: one compiled step, which costs less
      # here than the pixels it saves.
      'pad_sides': (128,), 'max_objects': 4})
  config.model.update({
      'num_classes': 11, 'num_queries': 10, 'hidden_dim': 64,
      'num_heads': 4, 'enc_layers': 2, 'dec_layers': 2,
      'dim_feedforward': 128, 'dropout_rate': 0.0,
      'backbone': 'resnet14', 'backbone_width': 16,
      # DC5: stride 16, so a 128 px canvas is 8x8 encoder tokens (4x4 at
      # stride 32 leaves position encodings little to do).
      'dilation': True})
  # As the release's recipe, for a backbone pretrained by
  # `experiments.detr.pretrain_backbone` (`backbone_init`): its stem and
  # layer1 frozen, the rest at a tenth of the rate. The rates are 10x the
  # release's: minutes on a CPU, not 150 epochs. Without a pretrained
  # backbone, set `optim.freeze_stem=False`.
  config.optim.update({'lr': 1e-3, 'backbone_lr': 1e-4, 'lr_drop_epoch': 0,
                       'freeze_stem': True})
  config.num_epochs = 20
  config.num_train_examples = 512
  config.log_every_steps = 10
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 100
  return config
