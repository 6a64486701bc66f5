"""Benchmark of the iRPE lookups against the plain attention core.

At DeiT-S shapes (B=32, H=6, L=197 = 1 + 14*14, D=64, contextual product,
ratio 1.9, 50 buckets, shared head, skip 1) this times, for every `impl` of
`irpe_jax.ops`, the forward and the forward+backward of

- rpe_k: `contextual_qk_encoding(q, table, ids)`, input q `(B, H, L, D)`;
- rpe_v: `contextual_v_encoding(a, table, ids)`, input attention weights
  `(B, H, L, L)`;

and of the plain attention core `softmax(q k^T) v` at the same shapes, plus
the compile time (lower + compile) of each. Besides the impls, the baseline
'gather_xla' is XLA's own `take_along_axis` and its scatter-add backward
(`segment_sum` for v), which the custom VJPs are measured against. Backward
passes take the gradients for the input and the table (for the core: q, k
and v) with a random cotangent passed as an argument: a constant cotangent
lets XLA fold large scatters away and flatters them.

All functions are compiled first, then timed round-robin (one call of each
per round, `--repeats` rounds after `--warmup` rounds), so that load from
other processes hits every entry alike; the table reports medians and the
ratios the targets are stated in. The targets are judged only at the
shapes they are set for (the defaults, float32, on CPU); at other shapes
(`--quick`, other methods), dtypes or backends the ratios are reported
without a verdict. `--dtype bfloat16` runs the inputs in bf16 with float32
tables, as mixed-precision training does; `--json PATH` also writes every
measurement (with XLA's temporary memory of each compiled function).

  python -m experiments.benchmarks.bench_rpe            # DeiT-S shapes
  python -m experiments.benchmarks.bench_rpe --quick    # tiny shapes, seconds
"""

import dataclasses
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib import cli
from irpe_jax import buckets
from irpe_jax import config as rpe_config_lib
from irpe_jax import ops

# Targets of the core issue, for this CPU, as fractions.
TARGET_K_VS_NAIVE = 0.35
TARGET_K_VS_CORE = 0.25
TARGET_V_VS_CORE = 0.35
TARGET_COMPILE_S = 5.0
# The shapes the targets are set for: DeiT-S, contextual product on keys.
TARGET_SHAPES = dict(batch=32, heads=6, height=14, width=14, skip=1,
                     head_dim=64, ratio=1.9, method='product',
                     shared_head=True)
# Not an impl: XLA's default gather and scatter-add, the baseline.
BASELINE = 'gather_xla'


@dataclasses.dataclass
class Entry:
  """One timed function: its compiled form, arguments and measurements."""
  name: str
  compiled: Callable[..., object]
  args: Tuple[jax.Array, ...]
  compile_s: float
  temp_bytes: Optional[int] = None
  times_ms: List[float] = dataclasses.field(default_factory=list)

  @property
  def median_ms(self) -> float:
    return statistics.median(self.times_ms)


def _compile(fn: Callable[..., object],
             args: Sequence[jax.Array]) -> Tuple[Callable[..., object], float]:
  """Jits `fn` and returns its compiled form and the lower+compile seconds."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _with_vjp(fn: Callable[..., jax.Array]) -> Callable[..., object]:
  """`(*args, ct) -> (fn(*args), grads of sum(fn * ct) for every arg)`."""

  def fwd_bwd(*args_and_ct):
    *args, ct = args_and_ct
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct)

  return fwd_bwd


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`softmax(q k^T) v`, per head, `(B, H, L, D)` in and out."""
  logits = jnp.einsum('bhid,bhjd->bhij', q, k)
  return jnp.einsum('bhij,bhjd->bhid', jax.nn.softmax(logits, axis=-1), v)


def _make_inputs(args: Any):
  """Random inputs, tables, cotangents and the static bucket geometry.

  Features, attention weights and cotangents are in `args.dtype`; the
  tables stay float32, as parameters do under mixed precision.
  """
  geometry = buckets.get_bucket_geometry(
      args.method, args.height, args.width, args.skip,
      *rpe_config_lib.piecewise_params(args.ratio))
  num_buckets = geometry.num_buckets
  length = args.skip + args.height * args.width
  table_heads = 1 if args.shared_head else args.heads
  keys = iter(jax.random.split(jax.random.key(args.seed), 12))
  feat = (args.batch, args.heads, length, args.head_dim)
  square = (args.batch, args.heads, length, length)
  normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32)
  q, k, v = normal(feat), normal(feat), normal(feat)
  attn = jax.nn.softmax(normal(square), axis=-1)
  table_k = 0.02 * normal((table_heads, args.head_dim, num_buckets))
  table_v = 0.02 * normal((table_heads, num_buckets, args.head_dim))
  dtype = jnp.dtype(args.dtype)
  inputs = dict(q=q, k=k, v=v, attn=attn, ct_square=normal(square),
                ct_feat=normal(feat))
  inputs = {name: x.astype(dtype) for name, x in inputs.items()}
  inputs.update(table_k=table_k, table_v=table_v)
  jax.block_until_ready(inputs)
  return geometry, inputs


def _build(args: Any, impls: Sequence[str]) -> Dict[str, Entry]:
  """Compiles every timed function; keys are `'{what}/{impl}/{fwd|fb}'`."""
  geometry, x = _make_inputs(args)
  entries = {}

  def add(name, fn, fn_args):
    compiled, seconds = _compile(fn, fn_args)
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)
    entries[name] = Entry(name, compiled, tuple(fn_args), seconds, temp)

  add('core/-/fwd', attention_core, (x['q'], x['k'], x['v']))
  add('core/-/fb', _with_vjp(attention_core),
      (x['q'], x['k'], x['v'], x['ct_feat']))
  for impl in impls:
    if impl == BASELINE:  # Private to ops: not an impl users can pick.
      rpe_k = functools.partial(ops._xla_qk_encoding, ids=geometry)
      rpe_v = functools.partial(ops._xla_v_encoding, ids=geometry)
    else:
      rpe_k = functools.partial(ops.contextual_qk_encoding, ids=geometry,
                                impl=impl)
      rpe_v = functools.partial(ops.contextual_v_encoding, ids=geometry,
                                impl=impl)
    add(f'k/{impl}/fwd', rpe_k, (x['q'], x['table_k']))
    add(f'k/{impl}/fb', _with_vjp(rpe_k),
        (x['q'], x['table_k'], x['ct_square']))
    add(f'v/{impl}/fwd', rpe_v, (x['attn'], x['table_v']))
    add(f'v/{impl}/fb', _with_vjp(rpe_v),
        (x['attn'], x['table_v'], x['ct_feat']))
  return entries


def _time(entries: Dict[str, Entry], warmup: int, repeats: int,
          seed: int) -> None:
  """Round-robin timing: each round calls every entry once.

  Each round takes a fresh random order: a fixed order measurably slowed
  whatever ran right after the attention core.
  """
  rng = random.Random(seed)
  order = list(entries.values())
  for round_index in range(warmup + repeats):
    rng.shuffle(order)
    for entry in order:
      start = time.perf_counter()
      jax.block_until_ready(entry.compiled(*entry.args))
      elapsed_ms = 1e3 * (time.perf_counter() - start)
      if round_index >= warmup:
        entry.times_ms.append(elapsed_ms)


def _check_agreement(entries: Dict[str, Entry], impls: Sequence[str]) -> float:
  """Worst relative difference of any impl's outputs and grads to 'naive'."""
  worst = 0.0
  for what in ('k', 'v'):
    for kind in ('fwd', 'fb'):
      ref_entry = entries[f'{what}/naive/{kind}']
      ref = jax.tree.leaves(ref_entry.compiled(*ref_entry.args))
      for impl in impls:
        entry = entries[f'{what}/{impl}/{kind}']
        got = jax.tree.leaves(entry.compiled(*entry.args))
        for a, b in zip(got, ref):
          a, b = np.asarray(a), np.asarray(b)
          scale = float(np.max(np.abs(b))) + 1e-12
          worst = max(worst, float(np.max(np.abs(a - b))) / scale)
  return worst


def _cpu_name() -> str:
  """The host CPU's model name where Linux tells it, else the platform's."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _at_target_shapes(args: Any) -> bool:
  return (all(getattr(args, name) == value
              for name, value in TARGET_SHAPES.items()) and
          args.dtype == 'float32' and jax.default_backend() == 'cpu')


def _report(entries: Dict[str, Entry], impls: Sequence[str],
            args: Any) -> bool:
  """Prints the table and the targets; returns whether all targets hold.

  Away from `TARGET_SHAPES` the targets are not judged (they hold).
  """
  core_fwd = entries['core/-/fwd'].median_ms
  core_fb = entries['core/-/fb'].median_ms
  length = args.skip + args.height * args.width
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}, '
        f'{jax.device_count()} device(s)) on {_cpu_name()}, '
        f'{os.cpu_count()} cores; jax {jax.__version__}, jaxlib '
        f'{jax.lib.__version__}; auto -> {ops.resolve_impl("auto")!r}')
  print(f'shapes: B={args.batch} H={args.heads} L={length} '
        f'({args.skip} + {args.height}x{args.width}) D={args.head_dim} '
        f'{args.method} ratio {args.ratio} shared_head={args.shared_head} '
        f'{args.dtype}; median of {args.repeats} rounds after {args.warmup} '
        f'warm-up')
  header = (f'{"what":<6}{"impl":<12}{"fwd ms":>9}{"fwd+bwd ms":>12}'
            f'{"compile s":>11}{"fb/naive":>10}{"fb/core":>9}{"fwd/core":>10}')
  print(header)
  print('-' * len(header))
  print(f'{"core":<6}{"-":<12}{core_fwd:9.2f}{core_fb:12.2f}'
        f'{entries["core/-/fb"].compile_s:11.2f}{"":>10}{1.0:9.3f}{1.0:10.3f}')
  best = {}
  for what in ('k', 'v'):
    naive_fb = entries[f'{what}/naive/fb'].median_ms
    for impl in impls:
      fwd = entries[f'{what}/{impl}/fwd']
      fb = entries[f'{what}/{impl}/fb']
      print(f'{"rpe_" + what:<6}{impl:<12}{fwd.median_ms:9.2f}'
            f'{fb.median_ms:12.2f}{fb.compile_s:11.2f}'
            f'{fb.median_ms / naive_fb:10.3f}{fb.median_ms / core_fb:9.3f}'
            f'{fwd.median_ms / core_fwd:10.3f}')
      if impl not in ('auto', BASELINE) and (what not in best or
                             fb.median_ms < best[what][1]):
        best[what] = (impl, fb.median_ms)
  k_impl, k_fb = best['k']
  v_impl, v_fb = best['v']
  k_naive = k_fb / entries['k/naive/fb'].median_ms
  slowest = max((e for e in entries.values() if e.name.endswith('/fb') and
                 not e.name.startswith('core')), key=lambda e: e.compile_s)
  checks = [
      (f'rpe_k fwd+bwd best ({k_impl}) <= {TARGET_K_VS_NAIVE}x naive',
       k_naive, k_naive <= TARGET_K_VS_NAIVE),
      (f'rpe_k fwd+bwd best ({k_impl}) <= {TARGET_K_VS_CORE}x core',
       k_fb / core_fb, k_fb / core_fb <= TARGET_K_VS_CORE),
      (f'rpe_v fwd+bwd best ({v_impl}) <= {TARGET_V_VS_CORE}x core',
       v_fb / core_fb, v_fb / core_fb <= TARGET_V_VS_CORE),
      (f'compile of every rpe fwd+bwd < {TARGET_COMPILE_S:g} s '
       f'(slowest {slowest.name})', slowest.compile_s,
       slowest.compile_s < TARGET_COMPILE_S),
  ]
  print()
  if not _at_target_shapes(args):
    print('Targets are set for ' + ', '.join(
        f'{k}={v}' for k, v in TARGET_SHAPES.items()) +
          ', float32, on CPU; not judged here.')
    for text, value, _ in checks:
      print(f'[-] {text}: {value:.3f}')
    return True
  for text, value, holds in checks:
    print(f'[{"HOLDS" if holds else "MISSED"}] {text}: {value:.3f}')
  return all(holds for _, _, holds in checks)


COMMAND = cli.Command('python -m experiments.benchmarks.bench_rpe', __doc__)
flags.DEFINE_integer('batch', 32, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('heads', 6, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('height', 14, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('width', 14, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('skip', 1, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('head_dim', 64, '', flag_values=COMMAND.flags)
flags.DEFINE_float('ratio', 1.9, '', flag_values=COMMAND.flags)
flags.DEFINE_string(
    'method', 'product',
    "'euc', 'quant', 'product', 'cross_rows' or "
    "'cross_cols'", flag_values=COMMAND.flags)
flags.DEFINE_bool(
    'unshared', False, 'one table per head instead of a shared one',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'impls', ','.join(ops.IMPLS + (BASELINE,)),
    'comma-separated impls (and the baseline '
    f'{BASELINE!r}); naive is always added', flag_values=COMMAND.flags)
flags.DEFINE_integer('repeats', 15, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('warmup', 2, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('seed', 0, '', flag_values=COMMAND.flags)
flags.DEFINE_enum(
    'dtype', 'float32', ('float32', 'bfloat16'),
    'dtype of the inputs (tables stay float32)', flag_values=COMMAND.flags)
flags.DEFINE_string(
    'json', None, 'also write the measurements as JSON to PATH',
    flag_values=COMMAND.flags)
flags.DEFINE_bool(
    'quick', False, 'tiny shapes and few repeats (a smoke test)',
    flag_values=COMMAND.flags)


def parse_args(argv: Sequence[str]) -> Any:
  """Command-line flags; `--quick` shrinks every size for a smoke run."""
  args = COMMAND.namespace(argv)
  args.shared_head = not args.unshared
  if args.quick:
    args.batch, args.heads, args.height, args.width = 2, 2, 4, 4
    args.head_dim, args.repeats, args.warmup = 8, 3, 1
  return args


def main(argv: Sequence[str] = ()) -> int:
  args = parse_args(argv)
  impls = [i for i in args.impls.split(',') if i]
  for impl in impls:
    if impl != BASELINE:
      ops.resolve_impl(impl)  # Fails early on a typo.
  if 'naive' not in impls:
    impls.append('naive')
  entries = _build(args, impls)
  worst = _check_agreement(entries, impls)
  _time(entries, args.warmup, args.repeats, args.seed)
  holds = _report(entries, impls, args)
  print(f'every impl agrees with naive to {worst:.1e} (relative to max)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results_dict(entries, args, worst, holds), f, indent=1)
  return 0 if holds else 1


def results_dict(entries: Dict[str, Entry], args: Any,
                 worst: float, holds: bool) -> Dict[str, Any]:
  """The measurements as plain data (what `--json` writes)."""
  device = jax.devices()[0]
  return {
      'backend': jax.default_backend(), 'device_kind': device.device_kind,
      'jax': jax.__version__, 'auto': ops.resolve_impl('auto'),
      'dtype': args.dtype,
      'shapes': {k: getattr(args, k) for k in TARGET_SHAPES},
      'targets_hold': holds, 'worst_relative_difference': worst,
      'entries': {name: {'median_ms': e.median_ms, 'compile_s': e.compile_s,
                         'temp_bytes': e.temp_bytes}
                  for name, e in entries.items()},
  }


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
