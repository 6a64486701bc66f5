"""Bad data in, a clear answer out: image folders with files that do not decode.

Every file here is written by Pillow (or is a real Pillow file cut short or
with its header patched), then read by the real readers: the folder source,
the grain train and eval iterators and `experiments.deit.train`.

- A truncated, empty, non-image or decompression-bomb file is named with its
  reason, logged once, skipped by training the same way on every run and
  resume, masked out of evaluation; too many of them stop the run with one
  `BadDataError` line.
- 16-bit, 32-bit, float and the other Pillow modes become 8-bit RGB with
  their range kept.
- An eval folder is labelled by the training folder's classes: a class that
  training lacks is an error, a missing one a warning.
"""

import io
import logging
import os
import pathlib
import shutil
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from experiments.deit.configs import common
from experiments.deit import input_pipeline
from experiments.deit import trainer
from experiments.lib import image_decode
import train_worker

# The bad files of the training folder, by name: (class, reason fragment).
BAD_TRAIN = {
    'cut.png': ('class_0', 'truncated'),
    'empty.png': ('class_1', 'empty file (0 bytes)'),
    'notes.png': ('class_1', 'not an image'),
    'bomb.png': ('class_2', 'decompression bomb: its header claims '
                            '20000x20000 = 400,000,000 pixels'),
    'cut.jpg': ('class_2', 'truncated'),
}
BAD_TEST = {'cut.png': ('class_2', 'truncated')}


def encoded(array, fmt='PNG'):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt)
  return buffer.getvalue()


def bomb_png(width=20000, height=20000):
  """A real 1x1 PNG whose IHDR (with a valid CRC) claims `width` x `height`."""
  data = bytearray(encoded(np.zeros((1, 1), np.uint8)))
  assert data[12:16] == b'IHDR'
  data[16:24] = struct.pack('>II', width, height)
  data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def write_bad(folder: pathlib.Path, name: str, rng) -> None:
  """Writes the bad file `name` (see BAD_TRAIN) into `folder`."""
  image = rng.integers(0, 255, (16, 20, 3)).astype(np.uint8)
  if name == 'cut.png':
    data = encoded(image)[:-60]  # the end of IDAT and IEND are gone.
  elif name == 'cut.jpg':
    data = encoded(image, 'JPEG')[:-100]  # in the scan, after the header.
  elif name == 'empty.png':
    data = b''
  elif name == 'notes.png':
    data = b'not a picture, a text file named .png\n'
  elif name == 'bomb.png':
    data = bomb_png()
  else:
    raise ValueError(name)
  (folder / name).write_bytes(data)


def write_split(root, split, count, bad, rng, classes=(0, 1, 2)):
  """`count` good 16x20 PNGs per class (a colour cue), plus the `bad` files."""
  for label in classes:
    folder = root / split / f'class_{label}'
    folder.mkdir(parents=True)
    for i in range(count):
      image = rng.integers(0, 255, (16, 20, 3)).astype(np.uint8)
      image[..., label] = 255
      Image.fromarray(image).save(folder / f'{i}.png')
  for name, (klass, _) in bad.items():
    write_bad(root / split / klass, name, rng)


@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory) -> pathlib.Path:
  """train: 3 x 8 good + 5 bad files; test: classes 0 and 2 (class_1 is
  missing), 2 x 3 good + 1 truncated."""
  root = tmp_path_factory.mktemp('bad_images')
  rng = np.random.default_rng(0)
  write_split(root, 'train', 8, BAD_TRAIN, rng)
  write_split(root, 'test', 3, BAD_TEST, rng, classes=(0, 2))
  return root


def make_config(**overrides):
  """The recipe's input config, shrunk to 8px batches of 4."""
  config = common.deit_recipe().input
  config.update(batch_size=4, eval_batch_size=4, image_size=8, num_threads=2,
                prefetch=2, crop_fraction=1.0, randaugment_ops=1)
  config.update(overrides)
  return config


def skip_lines(caplog):
  return [r.getMessage() for r in caplog.records
          if r.getMessage().startswith('Skipping unreadable image')]


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


# --- Reading one file --------------------------------------------------------


@pytest.mark.parametrize('name', sorted(BAD_TRAIN))
def test_read_image_names_the_file_and_why(tmp_path, name):
  write_bad(tmp_path, name, np.random.default_rng(0))
  with pytest.raises(image_decode.UnreadableImageError) as info:
    image_decode.read_image(str(tmp_path / name))
  assert info.value.path == str(tmp_path / name)
  assert BAD_TRAIN[name][1] in info.value.reason
  assert str(info.value).startswith(f'{tmp_path / name}: ')
  assert '\n' not in str(info.value)
  if name == 'bomb.png':  # the claim against Pillow's own, unchanged limit.
    assert f'{2 * Image.MAX_IMAGE_PIXELS:,} = 2 x Image.MAX_IMAGE_PIXELS' in (
        info.value.reason)


def test_large_image_under_the_bomb_limit_is_read_with_a_named_warning(
    tmp_path, monkeypatch, caplog):
  path = tmp_path / 'large.png'
  Image.fromarray(np.full((12, 12), 7, np.uint8)).save(path)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # 144 px: 1x-2x.
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      with pytest.warns(Image.DecompressionBombWarning):  # Pillow's, nameless.
        assert image_decode.read_image(str(path)).shape == (12, 12, 3)
  named = [m for m in caplog.messages if str(path) in m]
  assert len(named) == 1 and '12x12 = 144 pixels' in named[0]


def test_a_missing_file_is_unreadable_but_an_io_error_is_not_hidden(
    tmp_path, monkeypatch):
  with pytest.raises(image_decode.UnreadableImageError, match='cannot be '
                     'opened'):
    image_decode.read_image(str(tmp_path / 'gone.png'))
  path = tmp_path / 'x.png'
  path.write_bytes(encoded(np.zeros((2, 2), np.uint8)))
  real_open = open

  def failing_open(file, *args, **kwargs):
    if str(file) == str(path):
      raise OSError(5, 'Input/output error')
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr('builtins.open', failing_open)
  with pytest.raises(OSError, match='Input/output') as info:
    image_decode.read_image(str(path))
  assert not isinstance(info.value, image_decode.UnreadableImageError)


# --- Modes -------------------------------------------------------------------


def test_16_bit_png_keeps_its_range(tmp_path):
  ramp = (np.arange(256, dtype=np.uint16) * 257)[None].repeat(3, 0)  # 0..65535.
  Image.fromarray(ramp).save(tmp_path / 'ramp16.png')
  with Image.open(tmp_path / 'ramp16.png') as image:
    assert image.mode == 'I;16'
    # What convert('RGB') did before: clipped at 255, not scaled.
    assert set(np.unique(np.asarray(image.convert('RGB')))) <= {0, 1, 255}
  pixels = image_decode.read_image(str(tmp_path / 'ramp16.png'))
  assert pixels.shape == (3, 256, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, np.broadcast_to(
      np.arange(256, dtype=np.uint8)[None, :, None], (3, 256, 3)))


def png_16_bit_rgb(rgb16: np.ndarray) -> bytes:
  """A 48-bit RGB PNG (Pillow writes none), chunk by chunk."""
  height, width, _ = rgb16.shape
  rows = b''.join(b'\x00' + rgb16[y].astype('>u2').tobytes()
                  for y in range(height))

  def chunk(kind, body):
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I', zlib.crc32(kind + body)))

  return (b'\x89PNG\r\n\x1a\n' +
          chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 2, 0, 0,
                                     0)) +
          chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def test_16_bit_grey_and_colour_pngs_of_one_scene_read_the_same(tmp_path):
  grey = np.random.default_rng(0).integers(0, 65536, (4, 9)).astype(np.uint16)
  Image.fromarray(grey).save(tmp_path / 'grey.png')
  (tmp_path / 'rgb.png').write_bytes(png_16_bit_rgb(
      np.repeat(grey[..., None], 3, -1)))
  from_grey = image_decode.read_image(str(tmp_path / 'grey.png'))
  np.testing.assert_array_equal(
      from_grey, image_decode.read_image(str(tmp_path / 'rgb.png')))
  np.testing.assert_array_equal(from_grey[..., 0], grey >> 8)


def _palette_image():
  image = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), 'P')
  image.putpalette([10, 20, 30, 200, 100, 0, 255, 255, 255])
  return image


MODE_CASES = {
    # mode: (file format, image, expected (2, 2, 3) or (2, 2) grey)
    'L': ('PNG', Image.fromarray(np.array([[0, 9], [128, 255]], np.uint8)),
          [[0, 9], [128, 255]]),
    '1': ('PNG', Image.fromarray(np.array([[0, 1], [1, 0]], bool)),
          [[0, 255], [255, 0]]),
    'P': ('PNG', _palette_image(),
          [[[10, 20, 30], [200, 100, 0]], [[255, 255, 255], [200, 100, 0]]]),
    'LA': ('PNG', Image.fromarray(np.array(
        [[[5, 0], [60, 128]], [[200, 255], [255, 9]]], np.uint8), 'LA'),
           [[5, 60], [200, 255]]),
    'RGBA': ('PNG', Image.fromarray(np.array(
        [[[1, 2, 3, 0], [4, 5, 6, 255]], [[7, 8, 9, 1], [250, 251, 252, 77]]],
        np.uint8), 'RGBA'),
             [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [250, 251, 252]]]),
    # No Pillow writer takes 'PA': in memory only.
    'PA': (None, _palette_image().convert('PA'),
           [[[10, 20, 30], [200, 100, 0]], [[255, 255, 255], [200, 100, 0]]]),
    'CMYK': ('TIFF', Image.fromarray(np.array(
        [[[255, 0, 0, 0], [0, 255, 0, 0]], [[0, 0, 0, 255], [0, 0, 0, 0]]],
        np.uint8), 'CMYK'),
             [[[0, 255, 255], [255, 0, 255]], [[0, 0, 0], [255, 255, 255]]]),
    'I;16': ('PNG', Image.fromarray(np.array([[0, 257], [32896, 65535]],
                                             np.uint16)),
             [[0, 1], [128, 255]]),
    'I;16B': ('TIFF', Image.fromarray(np.array([[0, 512], [40000, 65535]],
                                               '>u2')),
              [[0, 2], [156, 255]]),
    # 32-bit ints within 0..65535 are 16-bit data.
    'I': ('TIFF', Image.fromarray(np.array([[0, 256], [65280, 65535]],
                                           np.int32)),
          [[0, 1], [255, 255]]),
    # Outside 0..65535 no range is declared: [min, max] -> 0..255.
    'I wide': ('TIFF', Image.fromarray(np.array([[-1000, 0], [99000, 199000]],
                                                np.int32)),
               [[0, 1], [128, 255]]),
    # Floats with max <= 1 are [0, 1] images.
    'F': ('TIFF', Image.fromarray(np.array([[0.0, 0.5], [1.0, np.nan]],
                                           np.float32)),
          [[0, 128], [255, 0]]),
    # Larger floats are 0..255 values, clipped.
    'F wide': ('TIFF', Image.fromarray(np.array([[-3.0, 100.4], [254.6, 300]],
                                                np.float32)),
               [[0, 100], [255, 255]]),
}


@pytest.mark.parametrize('case', sorted(MODE_CASES))
def test_every_mode_becomes_8_bit_rgb_with_its_range(tmp_path, case):
  fmt, image, expected = MODE_CASES[case]
  expected = np.asarray(expected, np.uint8)
  if expected.ndim == 2:
    expected = np.repeat(expected[..., None], 3, -1)
  assert image.mode == case.split()[0]
  pixels = image_decode.to_rgb8(image)
  assert pixels.dtype == np.uint8 and pixels.shape == (2, 2, 3)
  np.testing.assert_array_equal(pixels, expected)
  if fmt:  # and from a file, as the folder readers see it.
    path = tmp_path / f'image.{fmt.lower()}'
    image.save(path, fmt)
    with Image.open(path) as reopened:  # the file keeps the mode.
      assert reopened.mode == image.mode
    np.testing.assert_array_equal(image_decode.read_image(str(path)),
                                  expected)


# --- Training: skip, log once, replay, limit ---------------------------------


def test_training_skips_each_bad_file_logs_it_once_and_replays(
    bad_folder, caplog):
  root = bad_folder / 'train'
  config = make_config(max_bad_images=0.5)
  source = input_pipeline.ImageFolderSource(str(root))
  assert len(source) == 29
  # 10 steps of 4 are more than an epoch: every file is read, some twice.
  with caplog.at_level(logging.WARNING):
    batches = input_pipeline.train_iterator(source, config, 0, 10, seed=0)
    first = take(batches, 10)
    with pytest.raises(StopIteration):
      next(batches)
  lines = skip_lines(caplog)
  paths = {str(root / klass / name): reason
           for name, (klass, reason) in BAD_TRAIN.items()}
  assert len(lines) == len(paths), lines
  for path, reason in paths.items():
    mine = [line for line in lines if f'image {path}: ' in line]
    assert len(mine) == 1 and reason in mine[0], (path, lines)
  assert 'Skipping unreadable image' in lines[-1]
  assert f'5 of the 29 files of {root}' in lines[-1]  # the count.
  assert set(batches.bad_files) == set(paths)
  for batch in first:
    assert batch['image'].shape == (4, 8, 8, 3)
    assert np.all(np.isfinite(batch['image']))
    assert set(batch['label'].tolist()) <= {0, 1, 2}

  # Another run, and a resume at step 6, from fresh sources (nothing
  # remembered): the same batches, as the skip depends on the files only.
  again = take(input_pipeline.train_iterator(
      input_pipeline.ImageFolderSource(str(root)), config, 0, 10, seed=0), 10)
  resumed = take(input_pipeline.train_iterator(
      input_pipeline.ImageFolderSource(str(root)), config, 6, 10, seed=0), 4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  for a, b in zip(first[6:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def first_bad_error(root, config, steps=10):
  """The BadDataError of a run over `root` and the step it came at."""
  batches = input_pipeline.train_iterator(
      input_pipeline.ImageFolderSource(str(root)), config, 0, steps, seed=0)
  for step in range(steps):
    try:
      next(batches)
    except input_pipeline.BadDataError as e:
      return e, step
  raise AssertionError('no BadDataError')


def test_more_bad_files_than_the_limit_stop_with_one_line(bad_folder):
  config = make_config(max_bad_images=0.05)  # 1 of 29 is fine, 2 are not.
  error, step = first_bad_error(bad_folder / 'train', config)
  assert error.__class__ is input_pipeline.BadDataError  # not a wrapper.
  assert isinstance(error, ValueError)
  message = str(error)
  assert '\n' not in message and not getattr(error, '__notes__', None)
  assert message.startswith('2 of the 29 files of ')
  assert '(6.90%)' in message  # the share,
  assert 'input.max_bad_images=0.05 (5.00%)' in message  # the limit and key.
  again, again_step = first_bad_error(bad_folder / 'train', config)
  assert (str(again), again_step) == (message, step)  # deterministic.


def test_a_folder_of_only_bad_files_stops_cleanly_from_a_grain_thread(
    tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / 'a').mkdir()
  for name in ('empty.png', 'notes.png'):
    write_bad(tmp_path / 'a', name, rng)
  # A limit of 1 never stops the tally: the reader thread finds nothing.
  error, step = first_bad_error(tmp_path, make_config(max_bad_images=1.0))
  assert step == 0 and error.__class__ is input_pipeline.BadDataError
  # grain adds a note about its frames to what its threads raise: gone.
  assert not getattr(error, '__notes__', None)
  assert error.__cause__ is None and error.__suppress_context__
  assert str(error).startswith('Not one of the 2 files of ')


@pytest.mark.parametrize('value', [1.5, -0.1])
def test_max_bad_images_must_be_a_share(value):
  source = [{'image': np.zeros((4, 4, 3), np.uint8), 'label': 0}]
  with pytest.raises(ValueError, match='input.max_bad_images'):
    input_pipeline.train_iterator(source, make_config(max_bad_images=value),
                                  0, 1, seed=0)


# --- Evaluation --------------------------------------------------------------


def test_eval_masks_a_bad_image_and_logs_it_once(bad_folder, caplog):
  source, num_classes = input_pipeline.get_source(
      f'folder:{bad_folder}', 'test', classes_from='train')
  assert num_classes == 3 and len(source) == 7
  config = make_config(max_bad_images=0.5)
  bad_path = str(bad_folder / 'test' / 'class_2' / 'cut.png')
  with caplog.at_level(logging.WARNING):
    for _ in range(2):  # two evaluations of one source.
      batches = input_pipeline.eval_batches(source, config)
      seen = [b for b in batches]
      assert len(seen) == 2  # 7 files in batches of 4.
      masks = np.concatenate([b['mask'] for b in seen])
      labels = np.concatenate([b['label'] for b in seen])
      assert masks.sum() == 6  # 7 files, one unreadable (+ 1 padding).
      assert sorted(labels[masks > 0].tolist()) == [0, 0, 0, 2, 2, 2]
      assert batches.bad_files == {bad_path: batches.bad_files[bad_path]}
  lines = skip_lines(caplog)
  assert len(lines) == 1 and bad_path in lines[0] and 'truncated' in lines[0]
  left_out = [m for m in caplog.messages if 'left out (mask 0)' in m]
  assert len(left_out) == 2  # a count per evaluation.
  with pytest.raises(input_pipeline.BadDataError,
                     match=r'1 of the 7 files .*input.max_bad_images=0.1'):
    list(input_pipeline.eval_batches(source, make_config(max_bad_images=0.1)))


# --- Classes of the eval split -----------------------------------------------


def class_tree(root, splits):
  for split, names in splits.items():
    for name in names:
      (root / split / name).mkdir(parents=True)
      Image.fromarray(np.full((4, 4), ord(name[0]), np.uint8)).save(
          root / split / name / 'x.png')


def test_an_eval_class_that_training_lacks_is_an_error(tmp_path):
  class_tree(tmp_path, {'train': ['ant', 'bee'], 'test': ['ant', 'bee',
                                                          'cat']})
  with pytest.raises(ValueError, match=r"test' has class folder\(s\) \['cat'\]"
                     r' that the training split lacks'):
    input_pipeline.get_source(f'folder:{tmp_path}', 'test',
                              classes_from='train')


def test_a_missing_eval_class_is_a_warning_and_labels_stay_trains(
    tmp_path, caplog, capsys):
  class_tree(tmp_path, {'train': ['ant', 'bee', 'cat'], 'test': ['ant',
                                                                 'cat']})
  with caplog.at_level(logging.WARNING):
    source, num_classes = input_pipeline.get_source(
        f'folder:{tmp_path}', 'test', classes_from='train', print_fn=print)
  assert "no folder for 1 of the 3 training classes: ['bee']" in caplog.text
  assert f'class folders of {tmp_path / "train"}' in capsys.readouterr().out
  assert num_classes == 3 and source.classes == ['ant', 'bee', 'cat']
  assert [source[i]['label'] for i in range(2)] == [0, 2]  # not [0, 1].
  assert source[1]['image'][0, 0, 0] == ord('c')
  # Without a train/ folder the split's own folders label it (evaluate.py).
  own, count = input_pipeline.get_source(f'folder:{tmp_path}', 'test',
                                         classes_from='nothing_here')
  assert count == 2 and [own[i]['label'] for i in range(2)] == [0, 1]


# --- End to end --------------------------------------------------------------


def test_train_and_evaluate_runs_through_bad_files_and_names_them(
    bad_folder, tmp_path, caplog):
  # The tiny config of test_train.py: 4 steps of 8 (one epoch of the 29
  # files, so every bad one is read), evaluations at steps 2 and 4.
  config = train_worker.tiny_config(f'folder:{bad_folder}')
  config.input.max_bad_images = 0.2
  with caplog.at_level(logging.WARNING):
    out = trainer.train_and_evaluate(config, str(tmp_path))
  assert out['step'] == 4
  assert np.isfinite(out['eval']['loss'])
  assert 0.0 <= out['eval']['top1'] <= out['eval']['top5'] <= 1.0
  lines = skip_lines(caplog)
  expected = [bad_folder / 'train' / klass / name
              for name, (klass, _) in BAD_TRAIN.items()]
  expected += [bad_folder / 'test' / klass / name
               for name, (klass, _) in BAD_TEST.items()]
  for path in expected:
    assert sum(f'image {path}: ' in line for line in lines) == 1, (path, lines)
  assert len(lines) == len(expected)
  # The eval split (no class_1) is labelled by train's classes.
  assert "no folder for 1 of the 3 training classes: ['class_1']" in (
      caplog.text)


def test_an_eval_that_stops_on_bad_files_keeps_the_steps_checkpoint(
    bad_folder, tmp_path):
  root = tmp_path / 'data'
  shutil.copytree(bad_folder, root)
  for name in ('empty_a.png', 'empty_b.png'):   # test: 3 of 9 unreadable.
    (root / 'test' / 'class_0' / name).write_bytes(b'')
  config = train_worker.tiny_config(f'folder:{root}')
  config.input.max_bad_images = 0.2   # train's 5 of 29 pass, test's do not.
  workdir = tmp_path / 'run'
  with pytest.raises(input_pipeline.BadDataError,
                     match=r'2 of the 9 files of .*test \(22.22%\)'):
    trainer.train_and_evaluate(config, str(workdir))
  # The step was saved before its evaluation: a resume starts there.
  assert os.listdir(workdir / 'checkpoints') == ['2']
