r"""Top-1 / top-5 of a checkpoint on a dataset, as the release evaluates.

  python -m experiments.deit.evaluate \
      --model deit_small_patch16_224_ctx_product_50_shared_k \
      --checkpoint deit_small_patch16_224_ctx_product_50_shared_k.pth \
      --data imagenet2012 --data_dir ~/tensorflow_datasets

  python -m experiments.deit.evaluate \
      --config experiments/deit/configs/digits_folder.py \
      --checkpoint /tmp/digits_run --data folder:/tmp/digits

The model is a registered name (`irpe_jax.models.list_models()`) or the
model of a training config (`--config FILE[:ARG]`, as `experiments.deit.train`
builds it). The checkpoint is the release's `.pth`, a converted `.npz` or
Flax msgpack (`irpe_jax.convert`), or a training workdir (its `best/`
params, else its newest checkpoint). The data is a tfds name (`--data_dir`)
or `folder:PATH` with `PATH/SPLIT/CLASS/IMAGE`.

Images are prepared by the DeiT eval transform (`input_pipeline`): bicubic
resize of the shorter side to `image_size / crop_fraction` (0.875 for a
registered model: 256 for 224), centre crop, ImageNet mean and std. Batches
are sharded over all devices as in training, padded examples masked out.
"""

import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import tqdm

from experiments.deit import config_checks
from experiments.deit import input_pipeline
from experiments.deit import steps
from experiments.deit import trainer
from experiments.lib import checkpoints
from experiments.lib import cli
from experiments.lib import loop
from irpe_jax import convert
from irpe_jax import models

# The release's eval crop: resize to 256, centre crop 224 (timm's 0.875).
RELEASE_CROP_FRACTION = 0.875


def restore_workdir_params(workdir: str, target: Any) -> Tuple[Any, str]:
  """Params of a training workdir: its best, else its newest checkpoint.

  Read through the verified checkpoints and never written to
  (`checkpoints.read_run`): a damaged `best/` falls back to the newest good
  checkpoint, and the description says which were skipped.

  Args:
    workdir: a `--workdir` of `experiments.deit.train`.
    target: params of the model (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    `(params, description)`, e.g. `(params, 'best/1200')`.

  Raises:
    ValueError: the workdir holds no checkpoint, none restores, or the
      restored params do not fit the model (each misfit named).
  """
  tree, name = checkpoints.read_run(workdir)
  if not name.startswith('best/'):
    if not isinstance(tree, dict) or 'params' not in tree:
      raise ValueError(f'{workdir}/{name.split()[0]} holds no params: not a '
                       'checkpoint of experiments.deit.train.')
    tree = tree['params']
  where = os.path.join(workdir, name.split()[0])
  return checkpoints.match_params(tree, target, where), name


def load_checkpoint(path: str, model: Any) -> Tuple[Any, str]:
  """`(params, description)` of a `.pth`/`.npz`/msgpack file or a workdir."""
  if os.path.isdir(path):
    image = jnp.zeros((1, model.img_size, model.img_size, model.in_chans))
    target = jax.eval_shape(
        lambda: model.init(jax.random.key(0), image, train=False))['params']
    return restore_workdir_params(path, target)
  if not os.path.isfile(path):
    raise ValueError(f'--checkpoint {path!r} does not exist.')
  return convert.load_params(path, model), os.path.basename(path)


def evaluate(model: Any, params: Any, source: Any, input_config: Any,
             progress: bool = True) -> Dict[str, float]:
  """Mean loss, top-1 and top-5 of `model` over every example of `source`.

  Args:
    model: a classifier (`VisionTransformer`).
    params: its params.
    source: random-access `{'image': uint8 HWC, 'label': int}` examples.
    input_config: `image_size`, `crop_fraction`, `eval_batch_size` (global,
      a multiple of the device count), `num_threads`, `prefetch`.
    progress: show a progress bar (on a terminal).

  Returns:
    `{'loss', 'top1', 'top5', 'count'}`: means, and the number of examples.
  """
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  if input_config.eval_batch_size % jax.device_count():
    raise ValueError(f'batch size {input_config.eval_batch_size} must divide '
                     f'by the {jax.device_count()} devices.')
  eval_step = jax.jit(
      lambda p, b: steps.eval_step(p, b, model=model),
      in_shardings=(replicated, data), out_shardings=replicated)
  params = loop.replicate(params, replicated)
  num_batches = math.ceil(
      math.ceil(len(source) / jax.process_count())
      / (input_config.eval_batch_size // jax.process_count()))
  sums = None
  bar = tqdm.tqdm(input_pipeline.eval_batches(source, input_config),
                  total=num_batches, unit='batch', dynamic_ncols=True,
                  disable=None if progress else True)
  for batch in bar:
    out = eval_step(params, loop.global_batch(batch, data))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    host = jax.device_get(sums)
    bar.set_postfix(top1=f'{host["top1"] / max(host["count"], 1):.4f}',
                    refresh=False)
  bar.close()
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  count = max(sums['count'], 1.0)
  return {'loss': sums['loss'] / count, 'top1': sums['top1'] / count,
          'top5': sums['top5'] / count, 'count': int(sums['count'])}


def default_split(data: str) -> str:
  """'validation' for tfds; a folder's first of val/validation/test."""
  if data.startswith('folder:'):
    root = data[len('folder:'):]
    for split in ('val', 'validation', 'test'):
      if os.path.isdir(os.path.join(root, split)):
        return split
    raise ValueError(f'--data {data!r} has no val/, validation/ or test/ '
                     'folder: pass --split.')
  return 'validation'


COMMAND = cli.Command('python -m experiments.deit.evaluate', __doc__,
                      config='Training config FILE[:ARG] whose model and eval '
                      'preprocessing to use (or --model); --config.KEY=VALUE '
                      'overrides.')
FLAGS = COMMAND.flags
flags.DEFINE_string('model', None, 'Registered model name (or --config).',
                    flag_values=FLAGS)
flags.DEFINE_string('checkpoint', None, '.pth, .npz, Flax msgpack, or a '
                    'workdir of experiments.deit.train.', flag_values=FLAGS,
                    required=True)
flags.DEFINE_string('data', None, 'tfds name (e.g. imagenet2012) or '
                    'folder:PATH.', flag_values=FLAGS, required=True)
flags.DEFINE_string('split', None, 'Default: validation (tfds); val, '
                    'validation or test (folder).', flag_values=FLAGS)
flags.DEFINE_string('data_dir', None, 'tfds data directory.',
                    flag_values=FLAGS)
flags.DEFINE_integer('batch_size', None, "Global batch (default: the "
                     "config's eval_batch_size, 256 with --model).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('num_threads', 8, 'Image decoding threads.',
                     lower_bound=1, flag_values=FLAGS)
flags.register_multi_flags_validator(
    ['model', 'config'],
    lambda v: (v['model'] is None) != (v['config'] is None),
    'give one of --model and --config.', flag_values=FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
  """The command: `argv` as after `python -m experiments.deit.evaluate`."""
  return COMMAND.run(evaluate_from_flags, argv)


def evaluate_from_flags() -> Dict[str, float]:
  """The program: the data, model and checkpoint of the flags, evaluated."""
  args = FLAGS
  split = args.split or default_split(args.data)
  source, num_classes = input_pipeline.get_source(
      args.data, split, args.data_dir, classes_from='train', print_fn=print)
  if args.model:
    model = models.create_model(args.model)
    input_config = ml_collections.ConfigDict({
        'image_size': model.img_size, 'eval_batch_size': 256,
        'crop_fraction': RELEASE_CROP_FRACTION})
  else:
    config = args.config
    config_checks.check_deit_config(config)
    model = trainer.build_model(config, config.num_classes or num_classes)
    input_config = config.input
  input_config = ml_collections.ConfigDict(dict(input_config))
  input_config.num_threads = args.num_threads
  # grain uses at most `prefetch` of the threads.
  input_config.prefetch = max(input_config.get('prefetch', 0),
                              args.num_threads)
  if args.batch_size:
    input_config.eval_batch_size = args.batch_size
  if num_classes > model.num_classes:
    raise ValueError(f'{args.data} has {num_classes} classes, the model '
                     f'only {model.num_classes}.')
  params, name = load_checkpoint(args.checkpoint, model)
  print(f'Evaluating {name} on {len(source)} images of {args.data} '
        f'({split}) at {input_config.image_size}px, batch '
        f'{input_config.eval_batch_size} on {jax.device_count()} '
        f'{jax.default_backend()} device(s).', flush=True)
  result = evaluate(model, params, source, input_config)
  print(f'top-1 {100 * result["top1"]:.2f}%  top-5 {100 * result["top5"]:.2f}%'
        f'  loss {result["loss"]:.4f}  ({result["count"]} images)')
  return result


if __name__ == '__main__':
  main()
