"""Objects that a DETR-iRPE checkpoint detects in image files.

    python -m experiments.detr.predict \
        --checkpoint detr_irpe_rpe-2.0-product-ctx-1-k.pth \
        --enc_rpe2d rpe-2.0-product-ctx-1-k street.jpg kitchen.png

The checkpoint may be the release's `.pth` (`{'model': state_dict}`), an
`.npz` state dict, or a Flax msgpack file of the model's variables. Images
are prepared as the release evaluates them (shorter side 800, longer at
most 1333, ImageNet mean and std) and padded into one batch; each detection
is printed as `score  label  [x0, y0, x1, y1]` in pixels of the original
image, best first, down to `--threshold`.
"""

import sys
from typing import Dict, List, Optional, Sequence

from absl import flags
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


COMMAND = cli.Command('python -m experiments.detr.predict', __doc__,
                      positional=(('images', '+'),))
FLAGS = COMMAND.flags
flags.DEFINE_string('checkpoint', None, ".pth or .npz of the release, or a "
                    'Flax msgpack.', flag_values=FLAGS, required=True)
flags.DEFINE_string('enc_rpe2d', 'rpe-2.0-product-ctx-1-k', "The "
                    "checkpoint's iRPE, as the release names it ('' for "
                    'plain DETR).', flag_values=FLAGS)
flags.DEFINE_float('threshold', 0.7, 'Lowest score printed.',
                   flag_values=FLAGS)
flags.DEFINE_integer('size', 800, 'Shorter image side after resizing.',
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('max_size', 1333, 'Longest image side after resizing.',
                     lower_bound=1, flag_values=FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command: `argv` as after `python -m experiments.detr.predict`."""
  return COMMAND.run(predict, argv)


def predict(images: Sequence[str]) -> int:
  """Prints the detections of every image file; returns 0."""
  detr.parse_enc_rpe2d(FLAGS.enc_rpe2d)  # A bad string fails before loading.
  model = models.DETR(enc_rpe2d=FLAGS.enc_rpe2d, aux_loss=False)
  variables = convert.load_params(FLAGS.checkpoint, model)
  results = detect(model, variables, images, FLAGS.size, FLAGS.max_size)
  for path, found in zip(images, results):
    keep = found['scores'] >= FLAGS.threshold
    print(f'{path}: {int(keep.sum())} detections')
    for score, label, box in zip(found['scores'][keep], found['labels'][keep],
                                 found['boxes'][keep]):
      name = preprocess.COCO_CLASSES[label]
      corners = ', '.join(f'{x:.1f}' for x in box)
      print(f'  {score:.3f}  {name:<14}  [{corners}]')
  return 0


if __name__ == '__main__':
  sys.exit(main())
