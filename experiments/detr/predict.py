"""Objects that a DETR-iRPE checkpoint detects in image files.

    python -m experiments.detr.predict \
        --checkpoint detr_irpe_rpe-2.0-product-ctx-1-k.pth \
        --enc-rpe2d rpe-2.0-product-ctx-1-k street.jpg kitchen.png

The checkpoint may be the release's `.pth` (`{'model': state_dict}`), an
`.npz` state dict, or a Flax msgpack file of the model's variables. Images
are prepared as the release evaluates them (shorter side 800, longer at
most 1333, ImageNet mean and std) and padded into one batch; each detection
is printed as `score  label  [x0, y0, x1, y1]` in pixels of the original
image, best first, down to `--threshold`.
"""

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from experiments.detr import preprocess
from experiments.lib import cli
from irpe_jax import convert
from irpe_jax import models
from irpe_jax.models import detr


def detect(model: models.DETR, variables, paths: Sequence[str],
           size: int = 800, max_size: int = 1333
           ) -> List[Dict[str, np.ndarray]]:
  """Post-processed detections of every query, per image file.

  Returns:
    For each path: `scores (Q,)`, `labels (Q,)` (COCO ids), `boxes (Q, 4)`
    `(x0, y0, x1, y1)` in pixels of the original image, best score first.
  """
  loaded = [preprocess.load_image(p, size, max_size) for p in paths]
  images, mask = preprocess.pad_batch([image for image, _ in loaded])
  sizes = np.array([hw for _, hw in loaded], np.int32)

  @jax.jit
  def run(variables, images, mask, sizes):
    return models.post_process(model.apply(variables, images, mask), sizes)

  post = jax.tree.map(np.asarray, run(variables, images, mask, sizes))
  results = []
  for b in range(len(paths)):
    order = np.argsort(-post['scores'][b], kind='stable')
    results.append({k: v[b][order] for k, v in post.items()})
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.detr.predict',
      description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='.pth or .npz of the release, or a Flax msgpack')
  parser.add_argument('--enc-rpe2d', default='rpe-2.0-product-ctx-1-k',
                      help="the checkpoint's iRPE, as the release names it "
                      "('' for plain DETR)")
  parser.add_argument('--threshold', type=float, default=0.7,
                      help='lowest score printed')
  parser.add_argument('--size', type=cli.positive_int, default=800,
                      help='shorter image side after resizing')
  parser.add_argument('--max-size', type=cli.positive_int, default=1333,
                      help='longest image side after resizing')
  parser.add_argument('--log_level', default='info', choices=cli.LOG_LEVELS,
                      help='debug: a traceback for errors')
  parser.add_argument('images', nargs='+', help='image files')
  args = parser.parse_args(argv)
  # One line for an expected error; the traceback with --log_level=debug.
  with cli.one_line_errors(args.log_level == 'debug'):
    return predict(args)


def predict(args: argparse.Namespace) -> int:
  """Prints the detections of every image of `args`; returns 0."""
  detr.parse_enc_rpe2d(args.enc_rpe2d)  # A bad string fails before loading.
  model = models.DETR(enc_rpe2d=args.enc_rpe2d, aux_loss=False)
  variables = convert.load_params(args.checkpoint, model)
  results = detect(model, variables, args.images, args.size, args.max_size)
  for path, found in zip(args.images, results):
    keep = found['scores'] >= args.threshold
    print(f'{path}: {int(keep.sum())} detections')
    for score, label, box in zip(found['scores'][keep], found['labels'][keep],
                                 found['boxes'][keep]):
      name = preprocess.COCO_CLASSES[label]
      corners = ', '.join(f'{x:.1f}' for x in box)
      print(f'  {score:.3f}  {name:<14}  [{corners}]')
  return 0


if __name__ == '__main__':
  sys.exit(main())
