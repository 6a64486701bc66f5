"""experiments.deit.transforms: every op at every strength, mode and odd size.

Pure numpy and Pillow (no JAX computation), so each case takes microseconds.
"""

import math

import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from experiments.deit.configs import common
from experiments.deit import transforms

MODES = {'L': 1, 'RGB': 3, 'RGBA': 4}
SIZES = [(1, 1), (2, 3), (3, 2), (7, 5), (1, 9), (33, 17)]  # (width, height)
# Ops that leave an image exactly as it is at strength 0.
IDENTITY_AT_ZERO = ('Rotate', 'SolarizeIncreasing', 'SolarizeAdd',
                    'ColorIncreasing', 'ContrastIncreasing',
                    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX',
                    'ShearY', 'TranslateXRel', 'TranslateYRel')
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def random_image(mode, size, seed=0):
  width, height = size
  pixels = np.random.default_rng(seed).integers(
      0, 256, (height, width, MODES[mode]), dtype=np.uint8)
  return Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode)


def full_strength_config(**overrides):
  """The recipe's input config with every augmentation at its maximum."""
  config = common.deit_recipe().input
  config.update(image_size=8, randaugment_ops=4, randaugment_magnitude=10.0,
                random_erasing=1.0, crop_fraction=0.875)
  config.update(overrides)
  return config


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', transforms.RAND_AUGMENT_OPS)
def test_every_op_keeps_size_and_mode_at_every_strength(name, mode):
  op = transforms.RAND_AUGMENT_OPS[name]
  strengths = [0.0, 1.0, -1.0, *np.random.default_rng(1).uniform(-1, 1, 5)]
  for size in SIZES:
    image = random_image(mode, size)
    for m in strengths:
      out = op(image, float(m))
      assert (out.size, out.mode) == (image.size, image.mode), (size, m)
      if mode == 'RGBA' and name not in GEOMETRIC:  # colour ops keep alpha.
        np.testing.assert_array_equal(np.asarray(out)[..., 3],
                                      np.asarray(image)[..., 3])
    if name in IDENTITY_AT_ZERO:
      np.testing.assert_array_equal(np.asarray(op(image, 0.0)),
                                    np.asarray(image), err_msg=str(size))


@pytest.mark.parametrize('bits', range(9))
def test_posterize_is_pillows_and_zero_bits_make_a_black_image(bits):
  image = random_image('RGB', (7, 5))
  out = np.asarray(transforms.posterize(image, bits))
  if bits == 0:  # What the release's Pillow gave; Pillow >= 10 refuses 0.
    assert not out.any()
  else:
    np.testing.assert_array_equal(out,
                                  np.asarray(ImageOps.posterize(image, bits)))


@pytest.mark.parametrize('m, mask', [(1.0, 0x00), (-1.0, 0x00), (0.99, 0x80),
                                     (0.0, 0xF0)])
def test_posterize_increasing_keeps_4_down_to_0_bits(m, mask):
  # timm: 4 - int(|m| * 4) bits, 0 at full strength (this crashed on
  # Pillow 13).
  image = random_image('RGB', (7, 5))
  out = transforms.RAND_AUGMENT_OPS['PosterizeIncreasing'](image, m)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(image) & mask)


@pytest.mark.parametrize('threshold', [0, 1, 128, 255, 256])
def test_solarize_is_pillows_from_all_to_none_inverted(threshold):
  image = random_image('L', (33, 17))
  np.testing.assert_array_equal(
      np.asarray(transforms.solarize(image, threshold)),
      np.asarray(ImageOps.solarize(image, threshold)))


def test_solarize_add_saturates_below_the_threshold_only():
  image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
  out = np.asarray(transforms.solarize_add(image, 110)).ravel().astype(int)
  values = np.arange(256)
  np.testing.assert_array_equal(
      out, np.where(values < 128, np.minimum(values + 110, 255), values))


def test_geometric_ops_fill_with_timms_rounded_imagenet_mean():
  assert transforms.FILL_RGB == (124, 116, 104)  # round(255 * mean).
  white = Image.new('RGB', (33, 33), (255, 255, 255))
  for name in GEOMETRIC:
    out = transforms.RAND_AUGMENT_OPS[name](white, 1.0)
    corners = {out.getpixel((x, y)) for x in (0, 32) for y in (0, 32)}
    assert transforms.FILL_RGB in corners, name
  grey = transforms.RAND_AUGMENT_OPS['Rotate'](white.convert('L'), 1.0)
  assert grey.getpixel((0, 0)) == Image.new(
      'RGB', (1, 1), transforms.FILL_RGB).convert('L').getpixel((0, 0))
  # RGBA: colour and alpha move apart, so a transparent pixel keeps its
  # colour, and the fill is opaque.
  clear = Image.new('RGBA', (33, 33), (255, 255, 255, 0))
  rotated = transforms.RAND_AUGMENT_OPS['Rotate'](clear, 1.0)
  assert rotated.getpixel((0, 0)) == transforms.FILL_RGB + (255,)
  assert rotated.getpixel((16, 16)) == (255, 255, 255, 0)


@pytest.mark.parametrize('magnitude_std', [0.0, 0.5, math.inf])
@pytest.mark.parametrize('mode', MODES)
def test_rand_augment_at_full_strength_never_fails(mode, magnitude_std):
  rng = np.random.default_rng(0)
  for draw in range(40):
    image = random_image(mode, SIZES[draw % len(SIZES)], seed=draw)
    out = transforms.rand_augment(image, rng, num_ops=4, magnitude=10.0,
                                  magnitude_std=magnitude_std, prob=1.0)
    assert (out.size, out.mode) == (image.size, image.mode)


def test_rand_augment_magnitude_above_ten_is_clipped_to_ten():
  image = random_image('RGB', (7, 5))
  a = transforms.rand_augment(image, np.random.default_rng(3), 4, 10.0, 0.0,
                              1.0)
  b = transforms.rand_augment(image, np.random.default_rng(3), 4, 30.0, 0.0,
                              1.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('kwargs, match', [
    ({'num_ops': -1}, 'num_ops'), ({'prob': 1.5}, 'prob'),
    ({'magnitude': -1.0}, 'magnitude'), ({'magnitude_std': math.nan},
                                         'magnitude_std'),
])
def test_rand_augment_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    transforms.rand_augment(random_image('RGB', (4, 4)),
                            np.random.default_rng(0), **kwargs)


def test_rand_augment_rejects_other_modes():
  with pytest.raises(ValueError, match="'P'"):
    transforms.rand_augment(Image.new('P', (4, 4)), np.random.default_rng(0))


@pytest.mark.parametrize('size', SIZES)
def test_random_resized_crop_works_on_tiny_images(size):
  image = random_image('RGB', size)
  rng = np.random.default_rng(0)
  for _ in range(20):
    assert transforms.random_resized_crop(image, 4, rng).size == (4, 4)


def test_random_resized_crop_falls_back_to_timms_clamped_centre_crop():
  # No crop of the whole area with aspect in [2, 3] fits a 10x10 image, so
  # the fallback takes the centred 10x5 crop (aspect clamped to 2).
  image = random_image('RGB', (10, 10))
  out = transforms.random_resized_crop(image, 6, np.random.default_rng(0),
                                       scale=(1.0, 1.0), ratio=(2.0, 3.0))
  expected = image.crop((0, 2, 10, 7)).resize((6, 6), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize('scale', [(0.5, 0.1), (0.0, 1.0), (0.5,),
                                   (0.1, math.inf)])
def test_random_resized_crop_rejects_a_bad_scale_range(scale):
  with pytest.raises(ValueError, match='scale'):
    transforms.random_resized_crop(random_image('RGB', (4, 4)), 2,
                                   np.random.default_rng(0), scale=scale)


@pytest.mark.parametrize('shape', [(1, 1, 3), (1, 9, 3), (2, 2, 1), (5, 7, 3)])
def test_random_erasing_on_tiny_images_erases_less_than_the_whole(shape):
  rng = np.random.default_rng(0)
  image = np.zeros(shape, np.float32)
  for _ in range(20):
    out = transforms.random_erasing(image, rng, prob=1.0)
    assert out.shape == shape
    rows, cols = np.nonzero(np.any(out != 0, -1))
    if min(shape[:2]) == 1:  # No rectangle strictly inside a 1-pixel side.
      assert rows.size == 0
    elif rows.size:
      assert rows.max() - rows.min() + 1 < shape[0]
      assert cols.max() - cols.min() + 1 < shape[1]


def test_random_erasing_replaces_one_rectangle():
  image = np.zeros((16, 16, 3), np.float32)
  out = transforms.random_erasing(image, np.random.default_rng(0), prob=1.0)
  rows, cols = np.nonzero(np.any(out != 0, -1))
  assert rows.size > 0
  box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  assert np.all(np.any(box != 0, -1))


def expected_center_crop(image, size, crop_fraction):
  """torchvision's Resize + CenterCrop, computed directly with numpy."""
  width, height = image.size
  short = int(np.floor(size / crop_fraction))
  long = int(np.floor(short * max(width, height) / min(width, height)))
  new_w, new_h = (short, long) if width <= height else (long, short)
  # np.round rounds half to even, as Python's round in torchvision.
  top = int(np.round((new_h - size) / 2.0))
  left = int(np.round((new_w - size) / 2.0))
  resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
  return resized[top:top + size, left:left + size]


@pytest.mark.parametrize('crop_fraction', [0.875, 1.0, 0.9])
@pytest.mark.parametrize('size', [(19, 16), (16, 19), (37, 50), (50, 37),
                                  (33, 33), (301, 201), (17, 255), (1, 1),
                                  (2, 3)])
def test_center_crop_is_torchvisions_resize_and_center_crop(size,
                                                            crop_fraction):
  image = random_image('RGB', size)
  for out_size in (15, 16):
    out = transforms.center_crop(image, out_size, crop_fraction)
    assert out.size == (out_size, out_size)
    np.testing.assert_array_equal(
        np.asarray(out), expected_center_crop(image, out_size, crop_fraction))


def test_center_crop_offset_rounds_half_to_even_as_torchvision():
  # 19x16 to 16 at crop fraction 1: no resize, and the left offset is
  # round(1.5) = 2 (truncation gave 1); 21x16 gives round(2.5) = 2.
  for width, left in ((19, 2), (21, 2), (18, 1), (17, 0)):
    image = random_image('RGB', (width, 16))
    out = transforms.center_crop(image, 16, 1.0)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(image)[:, left:left + 16])


def test_predict_preprocesses_with_the_same_center_crop(tmp_path):
  from experiments.deit import predict  # pylint: disable=g-import-not-at-top
  image = random_image('RGB', (301, 203))
  image.save(tmp_path / 'x.png')
  np.testing.assert_array_equal(
      predict.preprocess(str(tmp_path / 'x.png'), 32),
      transforms.normalize(transforms.center_crop(image, 32, 0.875)))


@pytest.mark.parametrize('crop_fraction', [0.0, 1.5, math.nan])
def test_center_crop_rejects_a_crop_fraction_outside_0_1(crop_fraction):
  with pytest.raises(ValueError, match='crop_fraction'):
    transforms.center_crop(random_image('RGB', (4, 4)), 2, crop_fraction)


@pytest.mark.parametrize('shape', [(5, 7), (5, 7, 1), (5, 7, 2), (5, 7, 3),
                                   (5, 7, 4)])
def test_to_pil_makes_rgb_of_grey_and_alpha_images(shape):
  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  image = transforms.to_pil(pixels)
  assert image.mode == 'RGB' and image.size == (7, 5)
  if len(shape) == 2 or shape[-1] <= 2:  # grey: the same value 3 times.
    np.testing.assert_array_equal(np.asarray(image),
                                  np.repeat(pixels.reshape(5, 7, -1)[..., :1],
                                            3, -1))
  else:
    np.testing.assert_array_equal(np.asarray(image), pixels[..., :3])


@pytest.mark.parametrize('pixels', [np.zeros((4, 4, 3), np.float32),
                                    np.zeros((4, 4, 5), np.uint8),
                                    np.zeros((0, 4, 3), np.uint8),
                                    np.zeros((4,), np.uint8)])
def test_to_pil_rejects_what_is_not_a_uint8_image(pixels):
  with pytest.raises(ValueError, match='uint8'):
    transforms.to_pil(pixels)


@pytest.mark.parametrize('channels', [None, 1, 3, 4])
@pytest.mark.parametrize('size', [(1, 1), (3, 2), (5, 7), (40, 30)])
def test_train_and_eval_transforms_take_any_image_at_full_strength(size,
                                                                   channels):
  shape = size if channels is None else (*size, channels)
  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  config = full_strength_config()
  rng = np.random.default_rng(0)
  for _ in range(4):
    out = transforms.train_transform(pixels, rng, config)
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
  out = transforms.eval_transform(pixels, config)
  assert out.shape == (8, 8, 3) and np.all(np.isfinite(out))


def test_eval_transform_of_a_grey_image_is_its_normalised_value():
  config = ml_collections.ConfigDict({'image_size': 16, 'crop_fraction': 1.0})
  grey = transforms.eval_transform(np.full((20, 20, 1), 128, np.uint8), config)
  np.testing.assert_allclose(grey, np.broadcast_to(
      (128 / 255 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD,
      grey.shape), atol=1e-5)
