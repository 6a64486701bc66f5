r"""DETR with and without iRPE on the offline digits set, on a CPU.

  python -m experiments.detr.demo [--out /tmp/detr_demo] [--steps 1500]
      [--num_train 512] [--num_val 64]

Writes the digits set (`make_synthetic_coco`), trains the small DETR of
`configs/synthetic.py` (ResNet-14 of width 16 from scratch, two encoder and
decoder layers) once plain and once with contextual product iRPE on the keys
('rpe-2.0-product-ctx-1-k'), prints pycocotools' AP of both on the
validation canvases, and draws each model's detections (score >= 0.5) on the
first validation images: `OUT/detections_{plain,irpe}.png`, ground truth in
green, predictions in red with `digit:score`.
"""

import argparse
import os
import time
from typing import Dict, Sequence

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from experiments.detr import data
from experiments.detr import make_synthetic_coco
from experiments.detr import steps
from experiments.detr import train
from experiments.detr.configs import synthetic

MODELS = (('plain', 'plain'), ('irpe', 'rpe-2.0-product-ctx-1-k'))


def config_of(arg: str, root: str, num_steps: int):
  config = synthetic.get_config(arg)
  config.data.root = root
  config.total_steps = num_steps
  config.eval_every_steps = num_steps
  config.checkpoint_every_steps = num_steps
  config.log_every_steps = max(num_steps // 10, 1)
  return config


def draw(config, variables, examples, path: str, count: int = 8,
         threshold: float = 0.5) -> None:
  """A strip of `count` validation canvases with truth and detections."""
  model = train.build_model(config)
  chosen = examples[:count]
  batch = next(data.eval_batches(chosen, count, None, 1333,
                                 config.input.pad_sides,
                                 config.input.max_objects))
  out = jax.device_get(jax.jit(lambda v, b: steps.predict_step(
      v, b, model=model))(variables, {k: batch[k] for k in (
          'images', 'pixel_mask', 'orig_size')}))
  scale, tiles = 3, []
  for b, e in enumerate(chosen):
    image = Image.fromarray(e['image']).resize(
        (e['image'].shape[1] * scale, e['image'].shape[0] * scale),
        Image.NEAREST)
    pen = ImageDraw.Draw(image)
    h, w = e['orig_size']
    for cx, cy, bw, bh in e['boxes']:
      pen.rectangle([scale * w * (cx - bw / 2), scale * h * (cy - bh / 2),
                     scale * w * (cx + bw / 2), scale * h * (cy + bh / 2)],
                    outline=(0, 255, 0))
    for score, label, box in zip(out['scores'][b], out['labels'][b],
                                 out['boxes'][b]):
      if score >= threshold:
        x0, y0, x1, y1 = (scale * np.asarray(box)).tolist()
        pen.rectangle([x0, y0, x1, y1], outline=(255, 0, 0))
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


def run(out: str, num_steps: int, num_train: int, num_val: int
        ) -> Dict[str, Dict[str, float]]:
  root = os.path.join(out, 'digits_coco')
  make_synthetic_coco.make(root, num_train=num_train, num_val=num_val)
  results = {}
  for name, arg in MODELS:
    config = config_of(arg, root, num_steps)
    start = time.time()
    result = train.train_and_evaluate(config, os.path.join(out, name))
    seconds = time.time() - start
    results[name] = dict(result['eval'], seconds=seconds)
    state = result['state']
    examples = data.load_split(
        os.path.join(root, config.data.eval_images),
        os.path.join(root, config.data.eval_annotations))
    draw(config, {'params': state['params'],
                  'batch_stats': state['batch_stats']}, examples,
         os.path.join(out, f'detections_{name}.png'))
  return results


def main(argv: Sequence[str] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/detr_demo')
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--num_train', type=int, default=512)
  parser.add_argument('--num_val', type=int, default=64)
  args = parser.parse_args(argv)
  results = run(args.out, args.steps, args.num_train, args.num_val)
  print(f'{"model":>28s} {"AP":>6s} {"AP50":>6s} {"AP75":>6s} '
        f'{"train s":>8s}')
  for (name, arg), r in zip(MODELS, results.values()):
    print(f'{name + " (" + arg + ")":>28s} {r["AP"]:6.3f} {r["AP50"]:6.3f} '
          f'{r["AP75"]:6.3f} {r["seconds"]:8.0f}')
  print(f'pictures: {args.out}/detections_{{plain,irpe}}.png')


if __name__ == '__main__':
  main()
