r"""DETR with and without iRPE on the offline digits set, on a CPU.

  python -m experiments.detr.demo [--out /tmp/detr_demo] [--steps 4000]
      [--num_train 1024] [--num_val 128] [--seed 0] [--pretrain_steps 300]

Writes the digits set (`make_synthetic_coco`: scikit-learn's handwritten
digits pasted on 64-128 px canvases, COCO format), pretrains the backbone
as a digit classifier (`pretrain_backbone`: the release starts from an
ImageNet ResNet), and from it trains the small DETR of
`configs/synthetic.py` (ResNet-14 DC5 of width 16, two encoder and two
decoder layers) once plain and once with contextual product iRPE on
the keys ('rpe-2.0-product-ctx-1-k', the paper's best DETR setting), and
prints pycocotools' AP of both on the validation canvases, whose digits are
handwriting neither model saw. Pictures in `OUT`:

- `detections_{plain,irpe}.png`: the first validation canvases, truth in
  green, detections (score >= 0.5) in red with `digit:score`;
- `encoder_attention.png`: where one encoder query (+, the centre of a
  digit) attends in each encoder layer, heads averaged, for both models.

`OUT/{plain,irpe,digits_coco}` are deleted first: each run starts afresh.
"""

import os
import shutil
import time
from typing import Any, Dict, List, Sequence

from absl import flags
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from experiments.detr.configs import synthetic
from experiments.detr import data
from experiments.detr import make_synthetic_coco
from experiments.detr import pretrain_backbone
from experiments.detr import steps
from experiments.detr import trainer
from experiments.lib import cli
from irpe_jax import convert
from irpe_jax.models import resnet
from irpe_jax import viz

# (name, the release's --enc_rpe2d)
MODELS = (('plain', 'plain'), ('irpe', 'rpe-2.0-product-ctx-1-k'))


def config_of(arg: str, root: str, num_steps: int, num_train: int,
              seed: int) -> Any:
  config = synthetic.get_config(arg)
  config.seed = seed
  config.data.root = root
  config.num_train_examples = num_train
  config.total_steps = num_steps
  # DETR's step decay (the rate x0.1 for the last third of training, as the
  # release's epoch 100 of 150), in epochs of the digits set.
  per_epoch = max(num_train // config.input.batch_size, 1)
  config.optim.lr_drop_epoch = max(round(num_steps * 2 / 3 / per_epoch), 1)
  config.eval_every_steps = num_steps
  config.checkpoint_every_steps = num_steps
  config.log_every_steps = max(num_steps // 10, 1)
  return config


def _batch(config: Any, examples: Sequence[data.Example]
           ) -> Dict[str, np.ndarray]:
  return next(data.eval_batches(examples, len(examples), None,
                                config.input.max_size,
                                config.input.pad_sides,
                                config.input.max_objects))


def draw_detections(config: Any, variables: Any,
                    examples: Sequence[data.Example], path: str,
                    threshold: float = 0.5) -> None:
  """A strip of canvases, truth in green and detections in red."""
  model = trainer.build_model(config)
  batch = _batch(config, examples)
  out = jax.device_get(jax.jit(lambda v, b: steps.predict_step(
      v, b, model=model))(variables, {k: batch[k] for k in (
          'images', 'pixel_mask', 'orig_size')}))
  scale, tiles = 3, []
  for b, e in enumerate(examples):
    h, w = e['orig_size']
    image = Image.fromarray(e['image']).resize((w * scale, h * scale),
                                               Image.NEAREST)
    pen = ImageDraw.Draw(image)
    for cx, cy, bw, bh in e['boxes']:
      pen.rectangle([scale * w * (cx - bw / 2), scale * h * (cy - bh / 2),
                     scale * w * (cx + bw / 2), scale * h * (cy + bh / 2)],
                    outline=(0, 255, 0))
    for score, label, box in zip(out['scores'][b], out['labels'][b],
                                 out['boxes'][b]):
      if score >= threshold:
        x0, y0, x1, y1 = (scale * np.asarray(box)).tolist()
        pen.rectangle([x0, y0, x1, y1], outline=(255, 0, 0))
        # Category id `digit + 1` (id 0 unused, as COCO's).
        pen.text((x0 + 2, y0 + 1), f'{label - 1}:{score:.2f}',
                 fill=(255, 64, 64))
    tiles.append(image)
  strip = Image.new('RGB', (sum(t.width for t in tiles) + 4 * len(tiles),
                            max(t.height for t in tiles)))
  x = 0
  for t in tiles:
    strip.paste(t, (x, 0))
    x += t.width + 4
  strip.save(path)


def draw_encoder_attention(configs: Dict[str, Any],
                           variables: Dict[str, Any],
                           example: data.Example, path: str) -> None:
  """Encoder attention of the token at the first digit's centre."""
  batch = _batch(next(iter(configs.values())), [example])
  maps, grid = {}, None
  for name, config in configs.items():
    model = trainer.build_model(config)
    weights = viz.attention_weights(model, variables[name],
                                    batch['images'],
                                    pixel_mask=batch['pixel_mask'])
    maps[f'{name} ({config.model.enc_rpe2d or "no iRPE"})'] = (
        weights[:, 0].mean(1))  # (layers, L, L), heads averaged.
    stride = resnet.ResNet(dilate_last=config.model.dilation).stride
    grid = tuple(-(-s // stride) for s in batch['images'].shape[1:3])
  cx, cy = example['boxes'][0, :2]
  query = (min(int(cy * grid[0]), grid[0] - 1),
           min(int(cx * grid[1]), grid[1] - 1))
  viz.plot_attention_maps(path, maps, example['image'], grid, query,
                          blocks=range(next(iter(maps.values())).shape[0]),
                          skip=0)


def run(out: str, num_steps: int, num_train: int, num_val: int, seed: int,
        pretrain_steps: int) -> Dict[str, Dict[str, float]]:
  """Trains both models; returns their eval metrics and training seconds.

  Returns:
    `{'backbone': {'accuracy', 'seconds'}, 'plain': {...}, 'irpe': {...}}`,
    the models' entries pycocotools' metrics plus `seconds` and `compiles`.
  """
  root = os.path.join(out, 'digits_coco')
  # A fresh start each time: a workdir left by an earlier demo would
  # otherwise be resumed (and found finished).
  for name in [n for n, _ in MODELS] + ['digits_coco']:
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
  make_synthetic_coco.make(root, num_train=num_train, num_val=num_val,
                           seed=seed)
  # One pretrained backbone for both models: the comparison is of iRPE.
  start = time.time()
  backbone, accuracy = pretrain_backbone.pretrain(
      config_of('plain', root, num_steps, num_train, seed), pretrain_steps,
      seed)
  backbone_path = os.path.join(out, 'backbone.msgpack')
  convert.save_params(backbone_path, backbone)
  results, configs, variables = {}, {}, {}
  results['backbone'] = {'accuracy': accuracy,
                         'seconds': time.time() - start}
  for name, arg in MODELS:
    config = config_of(arg, root, num_steps, num_train, seed)
    config.backbone_init = backbone_path
    start = time.time()
    result = trainer.train_and_evaluate(config, os.path.join(out, name))
    results[name] = dict(result['eval'], seconds=time.time() - start,
                         compiles=result['compiles'])
    configs[name] = config
    variables[name] = {'params': result['state']['params'],
                       'batch_stats': result['state']['batch_stats']}
  examples: List[data.Example] = data.load_split(
      os.path.join(root, 'val'),
      os.path.join(root, 'annotations/instances_val.json'))
  # The largest canvases, in the order of the set.
  shown = sorted(examples, key=lambda e: -e['image'].shape[0])[:6]
  for name in configs:
    draw_detections(configs[name], variables[name], shown,
                    os.path.join(out, f'detections_{name}.png'))
  draw_encoder_attention(configs, variables, shown[0],
                         os.path.join(out, 'encoder_attention.png'))
  return results


COMMAND = cli.Command('python -m experiments.detr.demo', __doc__)
flags.DEFINE_string('out', '/tmp/detr_demo', '', flag_values=COMMAND.flags)
flags.DEFINE_integer('steps', 4000, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('num_train', 1024, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('num_val', 128, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('seed', 0, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('pretrain_steps', 300, '', flag_values=COMMAND.flags)


def main(argv: Sequence[str] = None) -> None:
  args = COMMAND.namespace(argv)
  results = run(args.out, args.steps, args.num_train, args.num_val,
                args.seed, args.pretrain_steps)
  backbone = results.pop('backbone')
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, seed '
        f'{args.seed}: backbone pretrained for {args.pretrain_steps} steps '
        f'({backbone["accuracy"]:.3f} digit accuracy, '
        f'{backbone["seconds"]:.0f} s), then {args.steps} DETR steps of 8 '
        f'canvases; AP on {args.num_val} validation canvases')
  print(f'{"model":>32s} {"AP":>6s} {"AP50":>6s} {"AP75":>6s} '
        f'{"APs":>6s} {"APm":>6s} {"train s":>8s}')
  for (name, arg), r in zip(MODELS, results.values()):
    print(f'{name + " (" + arg + ")":>32s} {r["AP"]:6.3f} {r["AP50"]:6.3f} '
          f'{r["AP75"]:6.3f} {r["APs"]:6.3f} {r["APm"]:6.3f} '
          f'{r["seconds"]:8.0f}')
  print(f'pictures: {args.out}/detections_{{plain,irpe}}.png, '
        f'{args.out}/encoder_attention.png')


if __name__ == '__main__':
  main()
