r"""Pretrains DETR's ResNet as a digit classifier, as DETR starts from ImageNet.

  python -m experiments.detr.pretrain_backbone OUT.msgpack \
      [--config experiments/detr/configs/synthetic.py] [--steps 400]

The release never trains its backbone from scratch: it starts from
torchvision's ImageNet ResNet-50 and trains DETR on top. The offline digits
set has no ImageNet, so this is its stand-in: the DETR config's ResNet
(`model.backbone`, `backbone_width`, `dilation`) with a global average pool
and a linear head learns to name one handwritten digit pasted on a 64 px
canvas (scikit-learn's training digits only: the first 1500, the ones the
detection set's train split uses). The frozen batch norms stay the identity,
as DETR keeps them. The head is dropped; `OUT.msgpack` holds the backbone's
`params` and `batch_stats` under DETR's names, which
`config.backbone_init=OUT.msgpack` loads into `experiments.detr.train`.
"""

from typing import Any, Dict, Sequence, Tuple

from absl import flags
import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn import datasets

from experiments.detr import make_synthetic_coco
from experiments.lib import cli
from experiments.lib import image_decode
from irpe_jax import convert
from irpe_jax.models import params as params_lib
from irpe_jax.models import resnet

CANVAS = 64


class DigitClassifier(nn.Module):
  """DETR's ResNet body, mean-pooled, then a linear head over 10 digits."""
  arch: str
  width: int
  dilation: bool

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    features = resnet.ResNet(resnet.DEPTHS[self.arch], width=self.width,
                             dilate_last=self.dilation, name='body')(images)
    return nn.Dense(10, name='head')(features.mean((1, 2)))


def make_canvases(count: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """`count` uint8 64 px canvases of one training digit, and the digit."""
  digits = datasets.load_digits()
  rng = np.random.default_rng(seed)
  images = np.zeros((count, CANVAS, CANVAS, 3), np.uint8)
  labels = np.zeros((count,), np.int32)
  for i in range(count):
    image, objects = make_synthetic_coco.make_image(
        rng, digits.images[:1500], digits.target[:1500], CANVAS,
        max_objects=1)
    images[i] = image
    labels[i] = objects[0]['category_id'] - 1
  return images, labels


def pretrain(config: Any, num_steps: int, seed: int = 0,
             batch_size: int = 64, lr: float = 1e-3, num_test: int = 512
             ) -> Tuple[Dict[str, Any], float]:
  """Trains the classifier; returns DETR's backbone variables and accuracy.

  Returns:
    `(backbone, accuracy)`: `{'params': {'backbone_0': {'body': ...}},
    'batch_stats': {...}}` for `detr.replace_backbone`, and the top-1
    accuracy on `num_test` held-out canvases (of training digits, new
    positions, sizes and tints).
  """
  model = DigitClassifier(config.model.backbone, config.model.backbone_width,
                          config.model.get('dilation', False))
  # Each canvas is seen about four times.
  images, labels = make_canvases(
      max(num_steps * batch_size // 4, batch_size) + num_test, seed)
  test_images, test_labels = images[-num_test:], labels[-num_test:]
  images, labels = images[:-num_test], labels[:-num_test]
  # uint8 in memory (a quarter of float32), normalised per batch.
  test_images = image_decode.normalize(test_images)
  variables = params_lib.jitted_init(model)(jax.random.key(seed),
                                            test_images[:1])
  tx = optax.adam(lr)
  opt_state = tx.init(variables['params'])

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({'params': p,
                            'batch_stats': variables['batch_stats']}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, rng = variables['params'], np.random.default_rng(seed + 1)
  for _ in range(num_steps):
    chosen = rng.integers(0, len(images), batch_size)
    params, opt_state = step(params, opt_state,
                             image_decode.normalize(images[chosen]),
                             labels[chosen])
  logits = jax.jit(model.apply)({'params': params,
                                 'batch_stats': variables['batch_stats']},
                                test_images)
  accuracy = float((np.argmax(logits, -1) == test_labels).mean())
  backbone = {'params': {'backbone_0': {'body': params['body']}},
              'batch_stats': {'backbone_0': {
                  'body': variables['batch_stats']['body']}}}
  return backbone, accuracy


COMMAND = cli.Command(
    'python -m experiments.detr.pretrain_backbone', __doc__,
    positional=(('out', 1),))
flags.DEFINE_string(
    'config', 'experiments/detr/configs/synthetic.py', '',
    flag_values=COMMAND.flags)
flags.DEFINE_integer('steps', 400, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('seed', 0, '', flag_values=COMMAND.flags)


def main(argv: Sequence[str] = None) -> None:
  args = COMMAND.namespace(argv)
  config = cli.load_config(args.config)
  backbone, accuracy = pretrain(config, args.steps, args.seed)
  convert.save_params(args.out, backbone)
  print(f'digit accuracy {accuracy:.3f} on 512 held-out canvases; '
        f'backbone written to {args.out}')


if __name__ == '__main__':
  main()
