r"""The paper's ablations on DeiT-S (Tables 1-4), one iRPE setting per run.

  python -m experiments.deit.train --workdir DIR --config \
      experiments/deit/configs/deit_ablation.py:mode=bias,method=cross,on=k

Comma-separated `key=value` argument (defaults in brackets):
- `mode` [ctx]: bias or ctx (Table 1: directed/undirected x bias/contextual);
- `method` [product]: euc, quant, cross, product (Table 1), with the
  release's ratio of each (euc 20, quant 33, cross 20, product 1.9) unless
  `ratio` is given;
- `on` [k]: any of q, k, v, or none for no iRPE (Table 2);
- `index` [piecewise]: piecewise or clip index function (Table 3);
- `shared` [1]: 1 for one table for all heads, 0 for one per head (Table 4);
- `abs` [1]: 0 removes the absolute position embedding (Table 4);
- `ratio`: overrides the method's ratio (bucket count).
"""

import ml_collections

from experiments.deit.configs import common
from irpe_jax import config as rpe_config_lib

DEFAULTS = {'mode': 'ctx', 'method': 'product', 'on': 'k',
            'index': 'piecewise', 'shared': '1', 'abs': '1', 'ratio': ''}


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  options = dict(DEFAULTS)
  for item in filter(None, arg.split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in DEFAULTS:
      raise ValueError(f'Bad ablation option {item!r}; expected key=value '
                       f'with key in {sorted(DEFAULTS)}.')
    options[key] = value
  config = common.deit_recipe()
  config.model_name = common.SIZES['small']
  config.model.use_abs_pos_embed = options['abs'] == '1'
  if options['on'] != 'none':
    config.rpe = {
        'ratio': float(options['ratio'] or
                       rpe_config_lib.METHOD_RATIOS[options['method']]),
        'method': options['method'], 'mode': options['mode'],
        'shared_head': options['shared'] == '1', 'skip': 1,
        'rpe_on': options['on'], 'index_fn': options['index']}
  return config
