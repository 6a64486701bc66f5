r"""Replays a new user's mistakes through the README's commands, one table out.

  python -m experiments.hostile_inputs [--out /tmp/hostile] [--quick]

Each case makes its bad input (an image folder with truncated, empty,
foreign and oversize files; split folders whose classes disagree; COCO
annotation files with one defect each; wrong config values; damaged,
mismatched and empty workdirs; impossible token grids), runs the command a
user would (`python -m experiments.deit.train ...`), and prints what came back:
the exit status, the answer (the `error:` line, or the warnings that name
the skipped files), and whether the run folder the command read is
unchanged byte for byte. A case passes when its answer holds the words it
expects and nothing that a user keeps was touched. Minutes on a 2-core CPU
(each command starts its own Python and imports jax).
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence
import zlib

from absl import flags
import numpy as np
from PIL import Image

from experiments.deit import make_digits_folder
from experiments.detr import make_synthetic_coco
from experiments.lib import cli

DIGITS = 'experiments/deit/configs/digits_folder.py'
DETR = 'experiments/detr/configs/synthetic.py:plain'
# A digits run cut to seconds: 2 steps of a 1-block model.
SHORT = {'total_steps': 2, 'eval_every_steps': 2, 'checkpoint_every_steps': 2,
         'log_every_steps': 1, 'input.batch_size': 16,
         'input.eval_batch_size': 30, 'model.depth': 1, 'progress_bar': False}
SHORT_FLAGS = [f'--config.{k}={v}' for k, v in SHORT.items()]
# The same as a config file, for the commands without --config.KEY flags.
SHORT_CONFIG = '''
import runpy
def get_config():
  config = runpy.run_path({digits!r})['get_config']()
  for key, value in {short!r}.items():
    *sections, leaf = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[leaf] = value
  return config
'''


@dataclasses.dataclass
class Case:
  name: str
  argv: List[str]                # after `python`.
  expect: str                    # words the answer must hold.
  exit_code: int = 1
  watch: Optional[str] = None    # a folder that must stay as it is.
  answer_from: str = 'error'     # 'error': the error line; else a grep word.


def snapshot(root: str) -> Dict[str, str]:
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): ('dir' if p.is_dir() else
                                     hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(root.rglob('*'))}


# --- Bad inputs ---------------------------------------------------------------


def bad_image_files(folder: pathlib.Path) -> None:
  """Truncated, empty, foreign and oversize files among good digits."""
  good = sorted(folder.glob('*.png'))[0].read_bytes()
  (folder / 'truncated.png').write_bytes(good[:len(good) // 2])
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'notes.png').write_text('not an image\n')
  # A real 1x1 PNG whose header claims 20000x20000 (CRC fixed).
  buffer = io.BytesIO()
  Image.new('L', (1, 1)).save(buffer, 'PNG')
  png = bytearray(buffer.getvalue())
  png[16:24] = struct.pack('>II', 20000, 20000)
  png[29:33] = struct.pack('>I', zlib.crc32(bytes(png[12:29])))
  (folder / 'bomb.png').write_bytes(bytes(png))


def sixteen_bit_png(path: pathlib.Path) -> None:
  ramp = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
  Image.fromarray(ramp).save(path)


def coco_defects(root: pathlib.Path, out: pathlib.Path) -> Dict[str, str]:
  """One copy of the synthetic COCO set per annotation defect."""
  source = json.loads((root / 'annotations/instances_train.json').read_text())

  def variant(name: str, edit: Callable[[dict], Optional[str]]) -> str:
    folder = out / name
    shutil.copytree(root, folder)
    coco = json.loads(json.dumps(source))
    text = edit(coco)
    (folder / 'annotations/instances_train.json').write_text(
        text if text is not None else json.dumps(coco))
    return str(folder)

  def set_first(key, value):
    def edit(coco):
      coco['annotations'][0][key] = value
    return edit

  def duplicate_image(coco):
    coco['images'][1]['id'] = coco['images'][0]['id']

  def unknown_image(coco):
    coco['annotations'][0]['image_id'] = 99999

  def no_annotations(coco):
    del coco['annotations']

  return {
      'category_id 50 of 11 classes': variant('cat50', set_first(
          'category_id', 50)),
      'category_id -1': variant('cat-1', set_first('category_id', -1)),
      'two images share an id': variant('dup', duplicate_image),
      'annotation of unknown image': variant('unknown', unknown_image),
      '3-number bbox': variant('bbox3', set_first('bbox', [1, 2, 3])),
      'no annotations key': variant('nokey', no_annotations),
      'malformed JSON': variant('json', lambda coco: json.dumps(coco)[:-40]),
  }


# --- The cases ----------------------------------------------------------------


def cases(out: pathlib.Path) -> List[Case]:
  """Makes every bad input under `out`; the commands that meet them."""
  digits = out / 'digits'
  make_digits_folder.write_digits(str(digits), size=32)
  # A small copy, so that 4 steps of 16 read every file of it.
  bad = out / 'bad_digits'
  for split, count in (('train', 5), ('test', 3)):
    for label in range(10):
      folder = bad / split / str(label)
      folder.mkdir(parents=True)
      for f in sorted((digits / split / str(label)).glob('*.png'))[:count]:
        shutil.copy(f, folder)
  bad_image_files(bad / 'train' / '3')
  (bad / 'test' / '7' / 'cut.png').write_bytes(
      sorted((digits / 'test' / '7').glob('*.png'))[0].read_bytes()[:60])
  sixteen_bit_png(bad / 'train' / '5' / 'sixteen_bit.png')
  extra = out / 'extra_class'
  shutil.copytree(digits, extra)
  shutil.copytree(digits / 'test' / '9', extra / 'test' / 'ten')
  missing = out / 'missing_class'
  shutil.copytree(digits, missing)
  shutil.rmtree(missing / 'test' / '4')
  coco = out / 'coco'
  make_synthetic_coco.make(str(coco), num_train=8, num_val=4, sides=(64,))
  defects = coco_defects(coco, out / 'coco_defects')

  train = ['-m', 'experiments.deit.train', '--config', DIGITS]
  run = str(out / 'run')          # trained by the first case, read later.
  result = [
      Case('bad files in train/ and test/', train + [
          f'--config.dataset=folder:{bad}', '--workdir', run,
          '--config.input.max_bad_images=0.1'] + SHORT_FLAGS + [
              '--config.total_steps=4', '--config.eval_every_steps=4',
              '--config.checkpoint_every_steps=2'],
           'truncated.png', 0, answer_from='Skipping unreadable'),
      Case('too many bad files', train + [
          f'--config.dataset=folder:{bad}', '--workdir',
          str(out / 'w_limit')] + SHORT_FLAGS + ['--config.total_steps=4'],
           'more than input.max_bad_images'),
      Case('test/ has a class train/ lacks', train + [
          f'--config.dataset=folder:{extra}', '--workdir',
          str(out / 'w_extra')] + SHORT_FLAGS, "'ten'"),
      Case('test/ lacks a class of train/', train + [
          f'--config.dataset=folder:{missing}', '--workdir',
          str(out / 'w_missing')] + SHORT_FLAGS, "'4'", 0,
           answer_from='WARNING'),
  ]
  for flag, expect in (('--config.total_steps=-5', 'total_steps=-5'),
                       ('--config.keep_checkpoints=0', 'keep_checkpoints=0'),
                       ('--config.input.batch_size=0', 'batch_size=0'),
                       ('--config.foo=1', "no key 'foo'")):
    result.append(Case(flag, train + [f'--config.dataset=folder:{digits}',
                                      '--workdir', str(out / 'w_cfg'), flag],
                       expect))
  short_config = out / 'short_config.py'
  short_config.write_text(SHORT_CONFIG.format(
      digits=str(pathlib.Path(DIGITS).resolve()), short=SHORT))
  evaluate = ['-m', 'experiments.deit.evaluate', '--config', str(short_config),
              '--data', f'folder:{digits}', '--checkpoint']
  result += [
      Case('evaluate a 1-block run with the 4-block config', [
          '-m', 'experiments.deit.evaluate', '--config', DIGITS, '--data',
          f'folder:{digits}', '--checkpoint', run], 'lacks', watch=run),
      Case('evaluate a run whose best/ is damaged', evaluate + [
          str(out / 'damaged_run')], 'skipped the damaged best/4', 0,
           watch=str(out / 'damaged_run'), answer_from='Evaluating'),
      Case('evaluate an empty folder', evaluate + [str(out / 'empty')],
           'holds no checkpoint', watch=str(out / 'empty')),
  ]
  for name, root in defects.items():
    result.append(Case(f'DETR: {name}', [
        '-m', 'experiments.detr.train', '--config', DETR,
        f'--config.data.root={root}', '--workdir', str(out / 'w_detr')],
                       'instances_train.json'))
  result += [
      Case('DETR: --config.input.batch_size=0', [
          '-m', 'experiments.detr.train', '--config', DETR,
          f'--config.data.root={coco}', '--workdir', str(out / 'w_detr'),
          '--config.input.batch_size=0'], 'batch_size=0'),
      Case('DETR evaluate: an empty folder', [
          '-m', 'experiments.detr.evaluate', '--config', DETR,
          f'--config.data.root={coco}', '--checkpoint', str(out / 'empty')],
           'holds no checkpoint', watch=str(out / 'empty')),
      Case('library: skip=1, L=17 on a 3x4 grid', ['-c', (
          'import jax.numpy as jnp, irpe_jax\n'
          "cfg = irpe_jax.get_rpe_config(skip=1, rpe_on='k')\n"
          'a = irpe_jax.IRPEAttention(num_heads=1, rpe_config=cfg)\n'
          'x = jnp.ones((1, 17, 8))\n'
          'import jax\n'
          'a.init(jax.random.key(0), x, height=3, width=4)\n')],
           'skip', exit_code=1),
      Case('library: a 200x200 grid', ['-c', (
          'import irpe_jax\n'
          "irpe_jax.get_bucket_ids_2d('product', 200, 200, 1, 1.9, 3.8, "
          '15.2)\n')], '200', exit_code=1),
  ]
  (out / 'empty').mkdir()
  return result


def run_case(case: Case, cwd: str) -> Dict[str, str]:
  before = snapshot(case.watch) if case.watch else None
  # As a user runs the command: one CPU device, whatever the caller's
  # XLA_FLAGS (the test suite's give 4 devices, which eval batches of 30
  # do not divide by).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  process = subprocess.run([sys.executable] + case.argv, cwd=cwd,
                           capture_output=True, text=True, check=False,
                           env=dict(env, JAX_PLATFORMS='cpu'))
  lines = [l for l in (process.stderr + process.stdout).splitlines()
           if l.strip()]
  library = case.argv[0] == '-c'
  if library:
    # A library raises: its answer is the exception's line.
    answer = [l for l in lines if l.startswith(('ValueError', 'TypeError'))]
  elif case.answer_from == 'error':
    answer = [l for l in lines if l.startswith(('error: ', 'Traceback'))
              ] or lines[-1:]
  else:
    answer = [l for l in lines if case.answer_from in l]
  text = ' | '.join(answer)
  unchanged = before is None or snapshot(case.watch) == before
  ok = (process.returncode == case.exit_code and case.expect in text
        and (library or 'Traceback' not in process.stderr) and unchanged)
  return {'case': case.name, 'exit': str(process.returncode),
          'answer': text, 'unchanged': '-' if before is None else
          ('yes' if unchanged else 'NO'), 'ok': 'ok' if ok else 'FAILED'}


COMMAND = cli.Command('python -m experiments.hostile_inputs', __doc__)
flags.DEFINE_string(
    'out', '/tmp/irpe_hostile_inputs',
    'where the bad inputs and runs are made (emptied)',
    flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'width', 160, 'characters of each answer printed',
    flag_values=COMMAND.flags)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = COMMAND.namespace(argv)
  out = pathlib.Path(args.out).resolve()
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  repo = str(pathlib.Path(__file__).resolve().parent.parent)
  todo = cases(out)
  # The first case trains the run that the evaluation cases read.
  results = [run_case(todo[0], repo)]
  shutil.copytree(out / 'run', out / 'damaged_run')
  step = out / 'damaged_run' / 'best' / '4'
  biggest = max((p for p in step.rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results += list(pool.map(lambda c: run_case(c, repo), todo[1:]))
  for r in results:
    print(f'[{r["ok"]:>6s}] {r["case"]}  (exit {r["exit"]}, run folder '
          f'unchanged: {r["unchanged"]})\n         {r["answer"][:args.width]}')
  failed = sum(r['ok'] != 'ok' for r in results)
  print(f'{len(results) - failed} of {len(results)} hostile inputs answered '
        'clearly.')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
