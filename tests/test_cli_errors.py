"""A user's mistake on any command line: one line, non-zero exit, no traceback.

Config checks are tested in-process; each command line runs as the user
runs it, `python -m ...` in a fresh process (several at once: each spends
its seconds importing jax).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from experiments.deit import config_checks as deit_checks
from experiments.deit import predict
from experiments.detr import config_checks as detr_checks
from experiments.detr.configs import coco
from experiments.detr.configs import synthetic
from experiments.lib import cli
from experiments.lib import config_checks

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIGITS = 'experiments/deit/configs/digits_folder.py'
DETR = 'experiments/detr/configs/synthetic.py'


def deit_config():
  return cli.load_config(DIGITS)


@pytest.mark.parametrize('key,value,message', [
    ('total_steps', -5, 'config.total_steps=-5; expected an int >= 0'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0; expected an int >= 1'),
    ('input.batch_size', 0, 'config.input.batch_size=0; expected an int >= 1'),
    ('input.eval_batch_size', -3, 'config.input.eval_batch_size=-3'),
    ('num_epochs', 0, r'config.num_epochs=0; expected a number in \(0, inf\)'),
    ('input.crop_scale', (0.9, 0.2), 'expected \\(min, max\\) with 0 < min'),
    ('optim.base_lr', -1.0, 'config.optim.base_lr=-1.0'),
    ('label_smoothing', 1.5, r'in \[0, 1\]'),
    ('nonfinite_policy', 'ignore', "expected one of \\('stop', 'skip'\\)"),
    ('dtype', 'float64', 'config.dtype'),
    ('model_name', 'deit_smal_patch16_224', "such as 'deit_small_patch16_224'"),
    ('seed', -1, 'config.seed=-1'),
])
def test_a_deit_value_that_cannot_run_is_named(key, value, message):
  config = deit_config()
  section, _, leaf = key.rpartition('.')
  (config[section] if section else config)[leaf] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    deit_checks.check_deit_config(config)


def test_unknown_config_keys_name_the_nearest_known_one():
  config = deit_config()
  config.input.batchsize = 3   # a typo in a config file adds a key silently.
  with pytest.raises(config_checks.ConfigError, match='config.input.batchsize '
                     'is not a key .* did you mean config.input.batch_size'):
    deit_checks.check_deit_config(config)
  config = deit_config()
  config.model.depht = 2
  with pytest.raises(config_checks.ConfigError, match='not a field of irpe_jax'
                     '.models.VisionTransformer; did you mean .*model.depth'):
    deit_checks.check_deit_config(config)
  config = deit_config()
  config.rpe = dict(config.rpe, methd='product')
  with pytest.raises(config_checks.ConfigError, match='config.rpe.methd .*'
                     'did you mean config.rpe.method'):
    deit_checks.check_deit_config(config)
  config = deit_config()
  config.rpe = dict(config.rpe, method='chebyshev')
  with pytest.raises(config_checks.ConfigError, match="config.rpe=.*chebyshev"):
    deit_checks.check_deit_config(config)
  for argv, message in (
      (['--config.totl_steps=3'], "no key 'totl_steps'; did you mean "
       '--config.total_steps'),
      (['--config.input.batchsize', '3'], 'did you mean --config.input.'
       'batch_size'),
      (['--config.foo=1'], "no key 'foo'$")):
    with pytest.raises(ValueError, match=message):
      cli.check_override_keys(argv, deit_config(), DIGITS)
  # Known keys, and a field given to a placeholder section, pass.
  config = deit_config()
  config.rpe = None
  cli.check_override_keys(['--config.input.batch_size=3', '--config.rpe.skip',
                           '1', '--', '--config.foo=1'], config, DIGITS)


@pytest.mark.parametrize('key,value,message', [
    ('input.batch_size', 0, 'config.input.batch_size=0'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0'),
    ('input.max_objects', 50, 'must not exceed config.model.num_queries=10'),
    ('eval_every_steps', -2, 'expected an int >= -1'),
    ('input.pad_sides', (), 'at least one side'),
    ('data.source', 'zip', "config.data.source='zip'"),
    ('model.enc_rpe2d', 'rpe-2.0-product', 'config.model.enc_rpe2d'),
])
def test_a_detr_value_that_cannot_run_is_named(key, value, message):
  config = synthetic.get_config('rpe-2.0-product-ctx-1-k')
  section, _, leaf = key.rpartition('.')
  (cli.config_value(config, section) if section else config)[leaf] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    detr_checks.check_detr_config(config)
  config = synthetic.get_config('plain')
  config.model.num_querys = 3
  with pytest.raises(config_checks.ConfigError,
                     match='did you mean config.model.num_queries'):
    detr_checks.check_detr_config(config)


def test_every_shipped_config_passes_its_checks():
  for path in sorted((ROOT / 'experiments/deit/configs').glob('*.py')):
    if path.name not in ('__init__.py', 'common.py'):
      deit_checks.check_deit_config(cli.load_config(str(path)))
  for arg in coco.RELEASED:
    detr_checks.check_detr_config(coco.get_config(arg))
    detr_checks.check_detr_config(synthetic.get_config(arg))


def test_predict_names_an_image_that_does_not_decode(tmp_path):
  path = tmp_path / 'cut.png'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new('RGB', (32, 32), (10, 20, 30)).save(path)
  path.write_bytes(path.read_bytes()[:40])
  with pytest.raises(ValueError, match=f'{path}: '):
    predict.preprocess(str(path), 16)


@pytest.fixture(scope='module')
def command_results(tmp_path_factory):
  """`(returncode, stderr)` of each command of COMMANDS, run at once."""
  tmp = tmp_path_factory.mktemp('cli')
  (tmp / 'empty').mkdir()
  workdir = str(tmp / 'never_made')
  deit = ['-m', 'experiments.deit.train', '--config', DIGITS, '--workdir',
          workdir]
  detr = ['-m', 'experiments.detr.train', '--config', DETR, '--workdir',
          workdir]
  commands = {
      'total_steps': deit + ['--config.total_steps=-5'],
      'keep_checkpoints': deit + ['--config.keep_checkpoints=0'],
      'batch_size': deit + ['--config.input.batch_size=0'],
      'unknown_key': deit + ['--config.foo=1'],
      'typo': deit + ['--config.totl_steps=3'],
      'no_config': ['-m', 'experiments.deit.train', '--config', 'nosuch.py',
                    '--workdir', workdir],
      'debug': deit + ['--config.input.batch_size=0', '--log_level=debug'],
      'detr_batch': detr + ['--config.input.batch_size=0'],
      'detr_arg': ['-m', 'experiments.detr.train', '--config',
                   'experiments/detr/configs/coco.py:bogus', '--workdir',
                   workdir],
      'detr_typo': detr + ['--config.model.num_querys=3'],
      'detr_evaluate': ['-m', 'experiments.detr.evaluate', '--config', DETR,
                        '--config.data.root', str(tmp / 'nodata'),
                        '--checkpoint', str(tmp / 'empty')],
      'evaluate': ['-m', 'experiments.deit.evaluate', '--model', 'nosuch',
                   '--checkpoint', str(tmp / 'empty'), '--data',
                   f'folder:{tmp}', '--split', 'empty'],
      'predict': ['-m', 'experiments.deit.predict', '--model',
                  'deit_tiny_patch16_224', '--checkpoint',
                  str(tmp / 'missing.pth'), 'x.png'],
      'detr_predict': ['-m', 'experiments.detr.predict', '--checkpoint',
                       str(tmp / 'missing.pth'), 'x.png'],
      'convert': ['-m', 'irpe_jax.convert', str(tmp / 'missing.pth'),
                  str(tmp / 'out.msgpack')],
      'convert_debug': ['-m', 'irpe_jax.convert', str(tmp / 'missing.pth'),
                        str(tmp / 'out.msgpack'), '--log_level=debug'],
  }
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  results = {}
  names = list(commands)
  for start in range(0, len(names), 4):   # 4 at a time on 2 cores.
    running = {n: subprocess.Popen([sys.executable] + commands[n], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
               for n in names[start:start + 4]}
    for name, process in running.items():
      _, stderr = process.communicate(timeout=300)
      results[name] = process.returncode, stderr
  assert not os.path.exists(workdir)   # the checks come before the workdir.
  assert not list((tmp / 'empty').iterdir())
  return results


@pytest.mark.parametrize('name,message', [
    ('total_steps', 'config.total_steps=-5; expected an int >= 0'),
    ('keep_checkpoints', 'config.keep_checkpoints=0; expected an int >= 1'),
    ('batch_size', 'config.input.batch_size=0; expected an int >= 1'),
    ('unknown_key', f"--config.foo: the config {DIGITS} has no key 'foo'"),
    ('typo', 'did you mean --config.total_steps?'),
    ('no_config', "no such file 'nosuch.py'"),
    ('detr_batch', 'config.input.batch_size=0'),
    ('detr_arg', "config arg 'bogus'"),
    ('detr_typo', 'did you mean --config.model.num_queries?'),
    ('detr_evaluate', 'nodata'),
    ('evaluate', ''),
    ('predict', 'missing.pth'),
    ('detr_predict', 'missing.pth'),
    ('convert', 'missing.pth'),
])
def test_each_command_line_error_is_one_line(command_results, name, message):
  returncode, stderr = command_results[name]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert returncode == 1, stderr
  assert 'Traceback' not in stderr, stderr
  assert lines[-1].startswith('error: ') and message in lines[-1], stderr
  assert sum(line.startswith('error: ') for line in lines) == 1, stderr


def test_log_level_debug_keeps_the_traceback(command_results):
  for name, error in (('debug', 'ConfigError'),
                      ('convert_debug', 'FileNotFoundError')):
    returncode, stderr = command_results[name]
    assert returncode == 1
    assert 'Traceback (most recent call last)' in stderr, stderr
    assert any(line.startswith(error) or f'.{error}: ' in line
               for line in stderr.splitlines()), stderr
