r"""Checks and measures irpe_jax on the accelerator at hand, in one report.

  python -m experiments.benchmarks.accelerator_check \
      [--out runs/accelerator_report.md] [--budget 470] [--batch N] [--quick]

`scripts/accelerator_check.sh` makes the environment and runs this. Each
part runs in its own process, under its own time limit and within
`--budget` seconds in all (a part that no longer fits is reported as
skipped); this process never touches the device, so each part has it to
itself:

1. the device: backend, devices, memory, jax version, what 'auto' picks;
2. the parity tests (tests/test_parity.py, test_modules.py, test_ops.py) on
   the accelerator, float32 matmuls at full precision
   (`JAX_DEFAULT_MATMUL_PRECISION=highest`: parity is a float32 claim; the
   default lets TPUs and recent GPUs round matmul inputs to bf16 or tf32);
3. `experiments.benchmarks.bench_rpe` at DeiT-S shapes: every impl, float32
   and bf16;
4. `experiments.benchmarks.bench_flash`: iRPE-K and iRPE-QKV attention
   through the Pallas kernels, blockwise and materialised, against plain
   attention (cuDNN's on GPU), L = 197 to 16385, bf16 on accelerators;
   its notes say how far the kernels' gradients agree with the
   materialised path's there;
5. `experiments.benchmarks.bench_train`: DeiT-S plain, iRPE-K and iRPE-QKV in
   float32 and bf16, one process each, so that the device's peak memory
   (`memory_stats()['peak_bytes_in_use']`) is the model's own; the batch is
   sized to the device's memory.

The report is a markdown file; every part's output is kept next to it, in
`<out>.logs/`. `--quick` shrinks every part to seconds (a smoke run on
CPU).
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence
import xml.etree.ElementTree as ElementTree

from absl import flags

from experiments.benchmarks import bench_flash
from experiments.benchmarks import bench_train
from experiments.lib import cli

REPO = pathlib.Path(__file__).resolve().parents[2]
PARITY_TESTS = ('tests/test_parity.py', 'tests/test_modules.py',
                'tests/test_ops.py')
DTYPES = ('float32', 'bfloat16')
# Seconds each part may take at most (the budget may give it less).
LIMITS = {'device': 60, 'tests': 90, 'bench_flash': 150, 'bench_rpe': 40,
          'bench_train': 40}
FLASH_LENGTHS = '197,1025,4097,16385'
# DeiT-S training memory per image at 224px (float32, measured on CPU with
# bench_train: ~140 MiB per image with parameters and AdamW state), with a
# margin: the batch is the largest power of two that fits half the device.
MIB_PER_IMAGE = 150
MAX_BATCH = 256

_DEVICE_INFO = r'''
import json, jax
from irpe_jax import ops
d = jax.devices()[0]
backend = jax.default_backend()
version = getattr(d.client, 'platform_version', '') or ''
platform = backend
if backend == 'gpu':
  platform = 'rocm' if 'rocm' in version.lower() else 'cuda'
stats = d.memory_stats() or {}
print(json.dumps({
    'backend': backend, 'platform': platform, 'device_kind': d.device_kind,
    'devices': [str(x) for x in jax.devices()], 'jax': jax.__version__,
    'jaxlib': jax.lib.__version__, 'platform_version': version,
    'bytes_limit': stats.get('bytes_limit'),
    'auto': ops.resolve_impl('auto', platform)}))
'''


def batch_for(bytes_limit: Optional[int]) -> int:
  """DeiT-S training batch for a device of `bytes_limit` bytes."""
  if not bytes_limit:
    return 16
  batch = 8
  while batch * 2 <= MAX_BATCH and (
      batch * 2 * MIB_PER_IMAGE * 2**20 <= bytes_limit / 2):
    batch *= 2
  return batch


class Runner:
  """Runs parts as subprocesses within a total budget; keeps their logs."""

  def __init__(self, budget_s: float, log_dir: pathlib.Path,
               env: Dict[str, str]):
    self.deadline = time.monotonic() + budget_s
    self.log_dir = log_dir
    self.env = env
    self.parts: List[Dict[str, Any]] = []
    log_dir.mkdir(parents=True, exist_ok=True)  # and the report's folder

  def run(self, name: str, cmd: Sequence[str], limit_s: float,
          env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Runs `cmd` for at most `limit_s` (and the budget left)."""
    log = self.log_dir / f'{name}.log'
    timeout = min(limit_s, self.deadline - time.monotonic())
    part = {'name': name, 'log': str(log), 'seconds': 0.0, 'stdout': ''}
    self.parts.append(part)
    if timeout < 5:
      part['status'] = 'skipped: out of time'
      print(f'[{name}] skipped: out of time', flush=True)
      return part
    print(f'[{name}] {" ".join(cmd)}  (limit {timeout:.0f} s)', flush=True)
    start = time.monotonic()
    # A session of its own, so that a timeout ends its children too.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
      out, _ = proc.communicate(timeout=timeout)
      part['status'] = 'ok' if proc.returncode == 0 else (
          f'exit {proc.returncode}')
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, _ = proc.communicate()
      part['status'] = f'timed out after {timeout:.0f} s'
    part['seconds'] = time.monotonic() - start
    part['stdout'] = out
    log.write_text(out)
    print(f'[{name}] {part["status"]} in {part["seconds"]:.0f} s', flush=True)
    return part


def _read_json(path: pathlib.Path) -> Optional[Dict[str, Any]]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _junit_counts(path: pathlib.Path) -> Optional[Dict[str, int]]:
  try:
    root = ElementTree.parse(path).getroot()
  except (OSError, ElementTree.ParseError):
    return None
  suites = [root] if root.tag == 'testsuite' else list(root)
  count = lambda key: sum(int(s.get(key, 0)) for s in suites)
  total, failed, errors, skipped = (count(k) for k in (
      'tests', 'failures', 'errors', 'skipped'))
  return {'passed': total - failed - errors - skipped, 'failed': failed,
          'errors': errors, 'skipped': skipped}


def run_all(args: Any) -> Dict[str, Any]:
  """Runs every part; returns what the report needs."""
  out = pathlib.Path(args.out).resolve()
  logs = out.with_name(out.name + '.logs')  # made by the Runner
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  runner = Runner(args.budget, logs, env)
  limits = {k: args.part_limit or v for k, v in LIMITS.items()}
  py = sys.executable
  results: Dict[str, Any] = {'parts': runner.parts, 'quick': args.quick}

  part = runner.run('device', [py, '-c', _DEVICE_INFO], limits['device'])
  lines = [l for l in part['stdout'].splitlines() if l.startswith('{')]
  device = json.loads(lines[-1]) if lines else {}
  results['device'] = device
  print(json.dumps(device, indent=1), flush=True)
  platform = device.get('platform', 'cpu')

  # conftest.py sets JAX_PLATFORMS=cpu unless it is set: name the
  # accelerator (and cpu, for the tests that need 4 host devices).
  test_env = dict(env, JAX_DEFAULT_MATMUL_PRECISION='highest',
                  JAX_PLATFORMS=platform if platform == 'cpu'
                  else f'{platform},cpu')
  junit = logs / 'tests.xml'
  tests = list(PARITY_TESTS)
  cmd = [py, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         f'--junitxml={junit}']
  if args.quick:
    cmd += ['tests/test_ops.py', '-k', 'test_bias_impls_agree']
  else:
    # Several processes share a GPU (no preallocation); a TPU takes one.
    workers = '0' if platform == 'tpu' else str(min(4, os.cpu_count() or 1))
    cmd += ['-n', workers] + tests
  runner.run('tests', cmd, limits['tests'], env=test_env)
  results['tests'] = _junit_counts(junit)

  path = logs / 'bench_flash.json'
  flash = ['--quick'] if args.quick else [
      '--lengths', FLASH_LENGTHS, '--repeats', '3', '--dtype',
      'float32' if platform == 'cpu' else 'bfloat16']
  runner.run('bench_flash', [py, '-m', 'experiments.benchmarks.bench_flash',
                             '--json', str(path)] + flash,
             limits['bench_flash'])
  results['bench_flash'] = _read_json(path)

  results['bench_rpe'] = {}
  for dtype in args.dtypes:
    path = logs / f'bench_rpe_{dtype}.json'
    cmd = [py, '-m', 'experiments.benchmarks.bench_rpe', '--dtype', dtype,
           '--json', str(path), '--repeats', '10'] + (
               ['--quick'] if args.quick else [])
    runner.run(f'bench_rpe_{dtype}', cmd, limits['bench_rpe'])
    results['bench_rpe'][dtype] = _read_json(path)

  batch = args.batch or batch_for(device.get('bytes_limit'))
  train_flags = ['--batch', str(batch), '--rounds', '3', '--steps', '2']
  if args.quick:
    train_flags = ['--batch', '2', '--image_size', '32', '--depth', '1',
                   '--rounds', '1', '--steps', '1']
  results['batch'] = int(train_flags[1])
  results['bench_train'] = {}
  for dtype in args.dtypes:
    for model in args.models:
      path = logs / f'bench_train_{model}_{dtype}.json'
      cmd = [py, '-m', 'experiments.benchmarks.bench_train', '--models', model,
             '--dtype', dtype, '--json', str(path)] + train_flags
      runner.run(f'bench_train_{model}_{dtype}', cmd,
                 limits['bench_train'])
      results['bench_train'][(model, dtype)] = _read_json(path)
  return results


def _ms(value: Optional[float]) -> str:
  return 'n/a' if value is None else f'{value:.2f}'


def _rpe_section(rpe: Dict[str, Optional[Dict[str, Any]]]) -> List[str]:
  lines = ['## iRPE lookups (`experiments.benchmarks.bench_rpe`)', '']
  for dtype, data in rpe.items():
    if not data:
      lines += [f'{dtype}: no result (see the part below).', '']
      continue
    shapes = data['shapes']
    lines += [f'{dtype}, B={shapes["batch"]} H={shapes["heads"]} '
              f'L={shapes["skip"]} + {shapes["height"]}x{shapes["width"]} '
              f'D={shapes["head_dim"]} {shapes["method"]}; tables float32; '
              f"'auto' runs {data['auto']!r} here.", '',
              '| lookup | impl | fwd ms | fwd+bwd ms | fwd+bwd / core | '
              'compile s | XLA temp MiB |', '|---|---|---|---|---|---|---|']
    entries = data['entries']
    core = entries['core/-/fb']['median_ms']
    lines.append(f'| core | - | {_ms(entries["core/-/fwd"]["median_ms"])} | '
                 f'{_ms(core)} | 1.00 | {entries["core/-/fb"]["compile_s"]:.1f}'
                 f' | {_mib(entries["core/-/fb"]["temp_bytes"])} |')
    verdicts = []
    for what in ('k', 'v'):
      impls = sorted({n.split('/')[1] for n in entries
                      if n.startswith(f'{what}/')})
      for impl in impls:
        fwd, fb = entries[f'{what}/{impl}/fwd'], entries[f'{what}/{impl}/fb']
        lines.append(f'| rpe_{what} | {impl} | {_ms(fwd["median_ms"])} | '
                     f'{_ms(fb["median_ms"])} | {fb["median_ms"] / core:.2f} | '
                     f'{fb["compile_s"]:.1f} | {_mib(fb["temp_bytes"])} |')
      chosen = [i for i in impls if i not in ('auto', 'gather_xla')]
      best = min(chosen, key=lambda i: entries[f'{what}/{i}/fb']['median_ms'])
      best_ms = entries[f'{what}/{best}/fb']['median_ms']
      auto_ms = entries.get(f'{what}/auto/fb', {}).get('median_ms')
      if auto_ms is not None:
        verdicts.append(
            f'rpe_{what}: fastest {best!r}, {best_ms:.2f} ms fwd+bwd; '
            f"'auto' runs {data['auto']!r}: {auto_ms:.2f} ms "
            f'({100 * (auto_ms / best_ms - 1):+.0f}%).')
    lines += [''] + [f'- {v}' for v in verdicts] + ['']
  return lines


def _mib(value: Optional[int]) -> str:
  return 'n/a' if value is None else f'{value / 2**20:.0f}'


def _flash_section(flash: Optional[Dict[str, Any]]) -> List[str]:
  lines = ['## iRPE attention: kernels, blockwise, materialised '
           '(`experiments.benchmarks.bench_flash`)', '']
  if not flash:
    return lines + ['No result (see the part below).', '']
  shapes = flash['shapes']
  fields = {f.name for f in dataclasses.fields(bench_flash.Entry)}
  entries = [bench_flash.Entry(**{k: v for k, v in e.items() if k in fields})
             for e in flash['entries']]
  lines += [f'B={shapes["batch"]} H={shapes["heads"]} D={shapes["head_dim"]}'
            f', {shapes.get("dtype", "float32")}, forward+backward; '
            f'{flash["device_kind"]}, jax {flash["jax"]}, commit '
            f'{flash["revision"]}.', '', bench_flash.markdown_table(entries),
            '']
  return lines + [f'- {line}' for line in
                  list(flash['notes']) + bench_flash.goal_lines(entries)] + ['']


def _train_section(train: Dict[Any, Optional[Dict[str, Any]]],
                   batch: int) -> List[str]:
  lines = ['## Training step (`experiments.benchmarks.bench_train`, DeiT-S, '
           'AdamW)', '',
           f'Batch {batch}; one process per row, so the device peak is the '
           "model's own. Overhead against plain DeiT-S of the same dtype, "
           'best step against best step.', '',
           '| model | dtype | images/s | s/step | vs DeiT-S | first step s | '
           'device peak MiB | XLA peak MiB |',
           '|---|---|---|---|---|---|---|---|']
  for (model, dtype), data in train.items():
    label = bench_train.MODEL_KEYS[model]
    row = (data or {}).get('models', {}).get(label)
    if not row:
      lines.append(f'| {label} | {dtype} | no result | | | | | |')
      continue
    base = ((train.get(('plain', dtype)) or {}).get('models', {})
            .get(bench_train.BASE))
    ratio = (None if not base or model == 'plain' else
             row['seconds_per_step'] / base['seconds_per_step'])
    overhead = '' if ratio is None else f'{100 * (ratio - 1):+.1f}%'
    lines.append(f'| {label} | {dtype} | {row["images_per_sec"]:.1f} | '
                 f'{row["seconds_per_step"]:.4f} | {overhead} | '
                 f'{row["first_step_s"]:.1f} | '
                 f'{_mib(data.get("device_peak_bytes"))} | '
                 f'{_mib(row["peak_bytes"])} |')
  return lines + ['']


def write_report(results: Dict[str, Any], path: pathlib.Path) -> str:
  """Writes the markdown report of `run_all`'s results; returns it."""
  device = results['device']
  parts = results['parts']
  total = sum(p['seconds'] for p in parts)
  lines = [f'# irpe_jax on {device.get("device_kind", "an unknown device")} '
           f'({device.get("platform", "?")})', '',
           f'jax {device.get("jax", "?")}, jaxlib {device.get("jaxlib", "?")}'
           f', devices: {", ".join(device.get("devices", [])) or "?"}; '
           f'memory {_mib(device.get("bytes_limit"))} MiB; '
           f"'auto' picks {device.get('auto', '?')!r} for this platform. "
           f'Made by `scripts/accelerator_check.sh` in {total:.0f} s'
           f'{" (--quick: smoke-run sizes)" if results["quick"] else ""}.',
           '', '## Parity tests (float32, full-precision matmuls)', '']
  tests = results.get('tests')
  if tests:
    lines += ['| passed | failed | errors | skipped |', '|---|---|---|---|',
              f'| {tests["passed"]} | {tests["failed"]} | {tests["errors"]} | '
              f'{tests["skipped"]} |', '']
  else:
    lines += ['No result (see the part below).', '']
  lines += _flash_section(results.get('bench_flash'))
  lines += _rpe_section(results['bench_rpe'])
  lines += _train_section(results['bench_train'], results['batch'])
  lines += ['## Parts', '', '| part | status | seconds | log |',
            '|---|---|---|---|']
  lines += [f'| {p["name"]} | {p["status"]} | {p["seconds"]:.0f} | '
            f'{os.path.relpath(p["log"], path.parent)} |' for p in parts]
  text = '\n'.join(lines) + '\n'
  path.write_text(text)
  return text


COMMAND = cli.Command(
    'python -m experiments.benchmarks.accelerator_check', __doc__)
flags.DEFINE_string(
    'out', 'runs/accelerator_report.md',
    'markdown report; part logs go to <out>.logs/', flag_values=COMMAND.flags)
flags.DEFINE_float(
    'budget', 420, 'seconds for all parts together', flag_values=COMMAND.flags)
flags.DEFINE_float(
    'part_limit', None,
    'seconds each part may take (default: per part, '
    f'{LIMITS})', flag_values=COMMAND.flags)
flags.DEFINE_integer(
    'batch', None, 'bench_train batch (default: sized to the device)',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'dtypes', ','.join(DTYPES), 'comma-separated, of float32 and bfloat16',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'models', ','.join(bench_train.MODEL_KEYS),
    'comma-separated bench_train models', flag_values=COMMAND.flags)
flags.DEFINE_bool(
    'quick', False, 'tiny sizes: a smoke run of every part',
    flag_values=COMMAND.flags)


def parse_args(argv: Sequence[str]) -> Any:
  args = COMMAND.namespace(argv)
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  args.models = [m for m in args.models.split(',') if m]
  if set(args.dtypes) - set(DTYPES) or set(args.models) - set(
      bench_train.MODEL_KEYS):
    cli.usage_error(f'--dtypes of {DTYPES}, --models of '
                 f'{tuple(bench_train.MODEL_KEYS)}.')
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  results = run_all(args)
  path = pathlib.Path(args.out).resolve()
  print(write_report(results, path))
  print(f'Report: {path}')
  # bench_rpe exits 1 where its CPU targets are missed: a finding, not a
  # failure of the check.
  failed = [p['name'] for p in results['parts']
            if p['status'] != 'ok' and not (
                p['name'].startswith('bench_rpe') and p['status'] == 'exit 1')]
  if failed:
    print(f'Parts that did not finish cleanly: {", ".join(failed)}.')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
