"""A tiny DETR config for the tests, also a `--config` file of the CLI.

  python -m experiments.detr.train --config tests/detr_tiny.py:ROOT ...

ResNet-14 of width 8, one encoder and one decoder layer of 32 features,
4 queries, iRPE-K, at 64x64 pixels on one padded batch shape, so each run
compiles its step once. `ROOT` is a set of `make_synthetic_coco`.
"""

from experiments.detr.configs import synthetic


def get_config(root: str = ''):
  config = synthetic.get_config('rpe-2.0-product-ctx-1-k')
  config.data.root = root or None
  config.input.update({'batch_size': 4, 'eval_batch_size': 4,
                       'pad_sides': (64,)})
  config.model.update({'backbone_width': 8, 'hidden_dim': 32,
                       'num_heads': 2, 'enc_layers': 1, 'dec_layers': 1,
                       'dim_feedforward': 64, 'num_queries': 4})
  # One recipe for every test: the jitted steps are cached per (model,
  # recipe), so the tests share one compile.
  config.optim.update({'lr': 1e-3, 'backbone_lr': 1e-3,
                       'freeze_stem': False})   # a backbone from scratch.
  config.total_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 2
  config.progress_bar = False
  return config

