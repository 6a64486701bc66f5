r"""Memory and speed of blockwise (flash) iRPE attention against materialised.

`--part attention`: iRPE-K and iRPE-QKV attention as DeiT configures it
(`get_rpe_config(ratio=1.9, method='product', mode='ctx', shared_head=True,
skip=1, rpe_on='k' | 'qkv')`, tables `N(0, 0.02^2)` rather than the
release's zeros; see `init_params`) at B=1, H=8, D=32 and `L = 1 + side *
side` tokens (a requested L is moved to the nearest such length; the table
says which were used). For each
L this compiles the forward+backward of

- 'materialized': `attention_with_rpe(..., attention_impl='materialized')`;
- 'blockwise': the same with `attention_impl='blockwise'`;
- 'pallas': the same with `attention_impl='pallas'`, the fused kernels
  (on GPU and TPU; on CPU only with `--quick`, where they are interpreted);
- plain 'blockwise': `attention_with_rpe` without iRPE, blockwise;
- plain 'dot_product': `jax.nn.dot_product_attention` (XLA), no iRPE;
- plain 'cudnn': the same with `implementation='cudnn'` (GPU only, and
  bf16 or fp16 only: run `--dtype bfloat16`);

as the gradients of `sum(out * ct)` w.r.t. q, k, v and the tables, with the
cotangent `ct` a random argument (a constant one lets XLA fold the backward
pass away). It reports XLA's memory analysis of each compiled program (the
temporary bytes, and arguments + outputs) against one `(B, H, L, L)` float32
array, and the median forward+backward time of `--repeats` calls after
`--warmup` (each length's programs called round-robin, so load from other
processes hits them alike; compile time is reported apart). A program whose
memory would not fit (`--max_gb`, default 80% of what the host or device
has free) is compiled but not run; a materialised one whose `(B, H, L, L)`
arrays alone (at least `MATERIALIZED_SQUARES` of them) would not fit is not
even compiled.

`--part detr`: one DETR-DC5 encoder layer (`models.detr_transformer.
EncoderLayer`: 8 heads, d_model 256, FFN 2048, the COCO config's iRPE
'rpe-2.0-product-ctx-1-k', skip 0) on an 800 x 1333 image at stride 16, a
50 x 84 map (L = 4200), batch 2 with a key padding mask (the second image
is 800 x 1066, its last 17 columns padded); the same memory and timing for
its `attention_impl` 'materialized' and 'blockwise', and plain DETR
(no iRPE) blockwise, for reference.

  # L 197, 1025, 4097, 16385:
  python -m experiments.benchmarks.bench_flash
  python -m experiments.benchmarks.bench_flash --lengths 1025,4097 \
      --repeats 3
  python -m experiments.benchmarks.bench_flash --part detr
  python -m experiments.benchmarks.bench_flash --quick  # tiny, seconds
  # On a GPU: the kernels against cuDNN's plain attention.
  python -m experiments.benchmarks.bench_flash --dtype bfloat16 \
      --impls materialized,pallas,cudnn
"""

import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib import cli
import irpe_jax
from irpe_jax.models import detr_transformer

LENGTHS = (197, 1025, 4097, 16385)
QUICK_LENGTHS = (17,)
# The goal of blockwise attention: its temporary memory at L = 4097 below
# this fraction of one (B, H, L, L) float32 array.
GOAL_LENGTH = 4097
GOAL_TEMP_FRACTION = 1 / 8
DETR_RPE = 'rpe-2.0-product-ctx-1-k'
# DETR-DC5: 800 x 1333 at stride 16 is ceil(800 / 16) x ceil(1333 / 16).
DETR_GRID = (50, 84)
DETR_VALID_WIDTH = 67  # the second image, 800 x 1066: ceil(1066 / 16).
# (label, rpe_on or None, attention_impl) of the attention part.
ATTENTION_VARIANTS = (
    ('iRPE-K', 'k', 'materialized'),
    ('iRPE-K', 'k', 'blockwise'),
    ('iRPE-QKV', 'qkv', 'materialized'),
    ('iRPE-QKV', 'qkv', 'blockwise'),
    ('iRPE-K', 'k', 'pallas'),
    ('iRPE-QKV', 'qkv', 'pallas'),
    ('plain', None, 'blockwise'),
    ('plain', None, 'dot_product'),
    ('plain', None, 'cudnn'),
)
IMPLS = ('materialized', 'blockwise', 'pallas', 'dot_product', 'cudnn')
# The kernels' goal on GPU: iRPE-K attention (fwd+bwd) within this factor
# of cuDNN's plain attention from `KERNEL_GOAL_LENGTH` tokens on.
KERNEL_GOAL_RATIO = 1.2
KERNEL_GOAL_LENGTH = 1024
# The fewest (B, H, L, L) float32 arrays a materialised forward+backward
# holds (XLA's temp at L = 4097: iRPE-K 3.0, iRPE-QKV 5.1, dot_product
# 4.0). Beyond the budget it is not even compiled: XLA CPU's compile of
# materialised iRPE-K at L = 16385 ran this 24 GB host out of memory.
MATERIALIZED_SQUARES = 3
GiB = 2 ** 30
MiB = 2 ** 20


@dataclasses.dataclass
class Entry:
  """One forward+backward program: its compiled form and measurements."""
  part: str
  label: str
  impl: str
  length: int
  grid: str
  square_bytes: int           # one (B, H, L, L) float32 array.
  compiled: Optional[Callable[..., Any]] = None
  args: Tuple[Any, ...] = ()
  compile_s: Optional[float] = None
  temp_bytes: Optional[int] = None
  io_bytes: Optional[int] = None   # arguments + outputs - aliased.
  skipped: Optional[str] = None
  times_ms: List[float] = dataclasses.field(default_factory=list)
  result: Any = None

  @property
  def median_ms(self) -> Optional[float]:
    return statistics.median(self.times_ms) if self.times_ms else None

  @property
  def min_ms(self) -> Optional[float]:
    return min(self.times_ms) if self.times_ms else None

  @property
  def peak_bytes(self) -> Optional[int]:
    if self.temp_bytes is None:
      return None
    return self.temp_bytes + self.io_bytes


def grid_for(length: int) -> Tuple[int, int]:
  """`(length used, side)`: `1 + side * side` nearest to `length`."""
  side = max(1, round(math.sqrt(max(length - 1, 1))))
  return 1 + side * side, side


def memory_budget(max_gb: Optional[float]) -> int:
  """Bytes a program may use: `max_gb`, else 80% of free memory."""
  if max_gb is not None:
    return int(max_gb * GiB)
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(0.8 * (stats['bytes_limit'] - stats.get('bytes_in_use', 0)))
  with open('/proc/meminfo') as f:
    info = {line.split(':')[0]: int(line.split()[1]) * 1024 for line in f}
  return int(0.8 * info['MemAvailable'])


def _random(key, shape, dtype=jnp.float32) -> jax.Array:
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


class _AttentionCore(nn.Module):
  """`attention_with_rpe` of per-head q, k, v with its iRPE tables."""
  rpe_config: Optional[irpe_jax.RPEConfig]
  head_dim: int
  num_heads: int
  attention_impl: str
  block_q: Optional[int] = None
  block_k: Optional[int] = None

  @nn.compact
  def __call__(self, q, k, v, height: int, width: int) -> jax.Array:
    rpe_q, rpe_k, rpe_v = irpe_jax.build_rpe(self.rpe_config, self.head_dim,
                                             self.num_heads)
    return irpe_jax.attention_with_rpe(
        q, k, v, scale=self.head_dim ** -0.5, rpe_q=rpe_q, rpe_k=rpe_k,
        rpe_v=rpe_v, height=height, width=width,
        attention_impl=self.attention_impl, block_q=self.block_q,
        block_k=self.block_k)


def init_params(init: Callable[..., Any], inputs: Sequence[Any],
                seed: int) -> Any:
  """Random parameters of the shapes `init(*inputs)` gives, from numpy.

  LayerNorm scales 1, biases 0, kernels `N(0, 1 / fan_in)`, iRPE tables
  `N(0, 0.02^2)` (non-zero, unlike the release's init). Only the shapes
  are traced: `init` itself would run (eagerly, op by op, or compiled:
  its random initialisers take seconds to compile) a whole forward pass.
  """
  shapes = jax.eval_shape(init, *inputs)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == 'bias':
      return jnp.zeros(leaf.shape, leaf.dtype)
    std = leaf.shape[0] ** -0.5 if name == 'kernel' else 0.02
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _loss_grads(apply: Callable[..., jax.Array], num_differentiated: int
                ) -> Callable[..., Any]:
  """`(params, *inputs, ct) -> (loss, grads)` of `loss = sum(out * ct)`.

  The gradients are w.r.t. the params and the first `num_differentiated`
  inputs; the others (a boolean mask) are passed through.
  """

  def fn(params, *inputs_and_ct):
    *inputs, ct = inputs_and_ct
    rest = inputs[num_differentiated:]
    loss = lambda params, *diff: jnp.sum(apply(params, *diff, *rest) * ct)
    argnums = tuple(range(num_differentiated + 1))
    return jax.value_and_grad(loss, argnums=argnums)(
        params, *inputs[:num_differentiated])

  return fn


def attention_program(rpe_on: Optional[str], impl: str, length: int,
                      side: int, args: Any, key
                      ) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
  """`(fn, args)`: loss and grads of one attention variant at `length`."""
  b, h, d = args.batch, args.heads, args.head_dim
  keys = jax.random.split(key, 4)
  q, k, v, ct = (_random(keys[i], (b, h, length, d), args.dtype)
                 for i in range(4))
  if impl in ('dot_product', 'cudnn'):
    # Its layout is (B, L, H, D); the inputs are made in it.
    q, k, v, ct = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, ct))
    implementation = 'cudnn' if impl == 'cudnn' else None
    apply = lambda params, q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation=implementation)
    return _loss_grads(apply, 3), ({}, q, k, v, ct)
  config = None if rpe_on is None else irpe_jax.get_rpe_config(
      ratio=1.9, method='product', mode='ctx', shared_head=True, skip=1,
      rpe_on=rpe_on)
  core = _AttentionCore(config, d, h, impl, args.block_q, args.block_k)
  params = init_params(lambda q, k, v: core.init(key, q, k, v, side, side),
                       (q, k, v), args.seed)
  apply = lambda params, q, k, v: core.apply(params, q, k, v, side, side)
  return _loss_grads(apply, 3), (params, q, k, v, ct)


def detr_program(rpe: str, impl: str, args: Any, key,
                 params: Optional[Any] = None
                 ) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
  """`(fn, args)`: loss and grads (params, src, pos) of one encoder layer.

  `params` default to a fresh init; every `attention_impl` has the same.
  """
  height, width = args.detr_grid
  length = height * width
  layer = detr_transformer.EncoderLayer(
      num_heads=args.detr_heads, dim_feedforward=args.detr_ffn,
      rpe_config=irpe_jax.parse_rpe_string(rpe) if rpe else None,
      attention_impl=impl)
  keys = jax.random.split(key, 3)
  shape = (args.detr_batch, length, args.detr_dim)
  src, pos, ct = (_random(keys[i], shape) for i in range(3))
  # True = padding: every image but the first ends at `valid_width`.
  columns = np.arange(length) % width
  padding = np.zeros((args.detr_batch, length), bool)
  padding[1:] = columns >= args.detr_valid_width
  padding = jnp.asarray(padding)
  if params is None:
    params = init_params(lambda src, pos, padding: layer.init(
        key, src, pos, padding, height, width), (src, pos, padding),
                         args.seed)
  apply = lambda params, src, pos, padding: layer.apply(
      params, src, pos, padding, height, width)
  return _loss_grads(apply, 2), (params, src, pos, padding, ct)


def compile_entry(entry: Entry, fn: Callable[..., Any],
                  fn_args: Tuple[Any, ...], budget: int) -> None:
  """Compiles, reads the memory analysis, and marks what cannot fit."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*fn_args).compile()
  entry.compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  if stats is not None:
    entry.temp_bytes = int(stats.temp_size_in_bytes)
    entry.io_bytes = int(stats.argument_size_in_bytes +
                         stats.output_size_in_bytes -
                         stats.alias_size_in_bytes)
    if entry.peak_bytes > budget:
      entry.skipped = f'skipped: would need {entry.peak_bytes / GiB:.1f} GB'
      return
  entry.compiled, entry.args = compiled, fn_args


def time_entries(entries: Sequence[Entry], warmup: int, repeats: int,
                 seed: int) -> None:
  """Round-robin timing, a fresh random order each round."""
  order = [e for e in entries if e.compiled is not None]
  rng = random.Random(seed)
  for round_index in range(warmup + repeats):
    rng.shuffle(order)
    for entry in order:
      start = time.perf_counter()
      result = jax.block_until_ready(entry.compiled(*entry.args))
      elapsed_ms = 1e3 * (time.perf_counter() - start)
      if entry.result is None:
        entry.result = result
      if round_index >= warmup:
        entry.times_ms.append(elapsed_ms)


def relative_difference(a: Any, b: Any) -> float:
  """Worst `max |a - b| / max |b|` over the leaves of two results."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    worst = max(worst, float(np.max(np.abs(x - y))) /
                (float(np.max(np.abs(y))) + 1e-30))
  return worst


def _release(entries: Sequence[Entry]) -> None:
  """Drops each entry's program, inputs and result (their memory)."""
  for entry in entries:
    entry.compiled, entry.args, entry.result = None, (), None


def run_attention(args: Any, budget: int
                  ) -> Tuple[List[Entry], List[str]]:
  """Compiles and times every attention variant at every length."""
  print(f'attention: B={args.batch} H={args.heads} D={args.head_dim}; '
        f'{", ".join(args.attention)}')
  entries, notes = [], []
  for requested in args.lengths:
    length, side = grid_for(requested)
    square = args.batch * args.heads * length * length * 4
    grid = f'1+{side}x{side}'
    print(f'L={length} ({grid}, requested {requested}): one (B, H, L, L) '
          f'float32 = {square / MiB:.1f} MiB', flush=True)
    here = []
    for label, rpe_on, impl in ATTENTION_VARIANTS:
      if label not in args.attention or impl not in args.impls:
        continue
      entry = Entry('attention', label, impl, length, grid, square)
      here.append(entry)
      estimate = MATERIALIZED_SQUARES * square
      if impl == 'cudnn' and (jax.default_backend() != 'gpu' or
                              args.dtype == jnp.float32):
        entry.skipped = ('skipped: cuDNN attention needs a GPU and bf16 or '
                         'fp16 (--dtype bfloat16)')
      elif impl in ('materialized', 'dot_product') and estimate > budget:
        entry.skipped = (f'skipped: would need > {estimate / GiB:.1f} GB '
                         f'(estimate, not compiled)')
      else:
        # One key for all: the same inputs and tables for each impl.
        fn, fn_args = attention_program(rpe_on, impl, length, side, args,
                                        jax.random.key(args.seed))
        compile_entry(entry, fn, fn_args, budget)
      print(f'  {label:<9}{impl:<13}' + _entry_status(entry), flush=True)
    time_entries(here, args.warmup, args.repeats, args.seed)
    for rpe_label in ('iRPE-K', 'iRPE-QKV'):
      mat = _find(here, rpe_label, 'materialized')
      for impl in ('blockwise', 'pallas'):
        other = _find(here, rpe_label, impl)
        if (mat and other and mat.result is not None and
            other.result is not None):
          notes.append(
              f'L={length} {rpe_label}: {impl} grads agree with '
              f'materialized to '
              f'{relative_difference(other.result[1], mat.result[1]):.1e} '
              f'(relative to max, worst leaf)')
    _release(here)
    entries += here
  return entries, notes


def run_detr(args: Any, budget: int
             ) -> Tuple[List[Entry], List[str]]:
  """Compiles and times one DETR encoder layer per attention_impl."""
  height, width = args.detr_grid
  length = height * width
  square = args.detr_batch * args.detr_heads * length * length * 4
  grid = f'{height}x{width}'
  print(f'DETR encoder layer: B={args.detr_batch}, L={length} ({grid}), '
        f'{args.detr_heads} heads, d_model {args.detr_dim}, FFN '
        f'{args.detr_ffn}, iRPE {args.detr_rpe!r}, padding from column '
        f'{args.detr_valid_width} of image 2; one (B, H, L, L) float32 = '
        f'{square / MiB:.1f} MiB', flush=True)
  entries, params = [], {}
  variants = (('DETR iRPE', args.detr_rpe, 'materialized'),
              ('DETR iRPE', args.detr_rpe, 'blockwise'),
              ('DETR plain', '', 'blockwise'))
  for label, rpe, impl in variants[:2] if args.quick else variants:
    entry = Entry('detr', label, impl, length, grid, square)
    entries.append(entry)
    fn, fn_args = detr_program(rpe, impl, args, jax.random.key(args.seed),
                               params.get(rpe))
    params[rpe] = fn_args[0]
    compile_entry(entry, fn, fn_args, budget)
    print(f'  {label:<11}{impl:<13}' + _entry_status(entry), flush=True)
  time_entries(entries, args.warmup, args.repeats, args.seed)
  notes = []
  materialized, blockwise = entries[0].result, entries[1].result
  if materialized is not None and blockwise is not None:
    notes.append(f'DETR L={length}: blockwise grads agree with '
                 f'materialized to '
                 f'{relative_difference(blockwise[1], materialized[1]):.1e} '
                 f'(relative to max, worst leaf)')
  _release(entries)
  return entries, notes


def _find(entries: Sequence[Entry], label: str, impl: str
          ) -> Optional[Entry]:
  return next((e for e in entries if e.label == label and e.impl == impl),
              None)


def _entry_status(entry: Entry) -> str:
  if entry.temp_bytes is None:
    return entry.skipped or 'no memory analysis'
  text = (f'temp {entry.temp_bytes / MiB:9.1f} MiB, args+out '
          f'{entry.io_bytes / MiB:7.1f} MiB, compile {entry.compile_s:.2f} s')
  return text + (f'; {entry.skipped}' if entry.skipped else '')


def _mib(value: Optional[int]) -> str:
  return '-' if value is None else f'{value / MiB:.1f}'


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  return '-' if a is None or b is None else f'{a / b:.2f}'


def _short(skipped: Optional[str]) -> str:
  """'skipped: would need > 24.0 GB (...)' -> 'skipped (> 24.0 GB)'."""
  if not skipped:
    return '-'
  need = skipped.split('would need ')[-1].split(' (')[0]
  return f'skipped ({need})'


def markdown_table(entries: Sequence[Entry]) -> str:
  """The docs' table: memory, compile time and speed of every entry."""
  lines = [
      '| part | L (grid) | attention | impl | temp MiB | temp / (B,H,L,L) '
      '| args+out MiB | compile s | fwd+bwd ms | min ms | / materialized '
      '| / plain blockwise | / plain cuDNN |',
      '|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for e in entries:
    same = [x for x in entries if x.part == e.part and x.length == e.length]
    materialized = next((x for x in same if x.label == e.label and
                         x.impl == 'materialized'), None)
    plain = next((x for x in same if x.label.endswith('plain') and
                  x.impl == 'blockwise'), None)
    cudnn = next((x for x in same if x.label.endswith('plain') and
                  x.impl == 'cudnn'), None)
    over_mat = over_plain = over_cudnn = '-'
    fused = e.impl in ('blockwise', 'pallas')
    if fused and materialized is not None:
      over_mat = _ratio(e.median_ms, materialized.median_ms)
    if fused and plain is not None and plain is not e:
      over_plain = _ratio(e.median_ms, plain.median_ms)
    if 'iRPE' in e.label and cudnn is not None:
      over_cudnn = _ratio(e.median_ms, cudnn.median_ms)
    fraction = ('-' if e.temp_bytes is None else
                f'{e.temp_bytes / e.square_bytes:.3f}')
    time_ms = (f'{e.median_ms:.1f}' if e.median_ms is not None else
               _short(e.skipped))
    min_ms = '-' if e.min_ms is None else f'{e.min_ms:.1f}'
    compile_s = '-' if e.compile_s is None else f'{e.compile_s:.2f}'
    lines.append(f'| {e.part} | {e.length} ({e.grid}) | {e.label} | {e.impl} '
                 f'| {_mib(e.temp_bytes)} | {fraction} | {_mib(e.io_bytes)} '
                 f'| {compile_s} | {time_ms} | {min_ms} | {over_mat} '
                 f'| {over_plain} | {over_cudnn} |')
  return '\n'.join(lines)


def goal_lines(entries: Sequence[Entry]) -> List[str]:
  """The memory goal at `GOAL_LENGTH`, where that length was measured."""
  lines = []
  for e in entries:
    if (e.part == 'attention' and e.impl in ('blockwise', 'pallas') and
        e.length == GOAL_LENGTH and e.temp_bytes is not None):
      fraction = e.temp_bytes / e.square_bytes
      verdict = 'HOLDS' if fraction < GOAL_TEMP_FRACTION else 'MISSED'
      lines.append(f'[{verdict}] {e.label} {e.impl} temp at L={e.length}: '
                   f'{fraction:.4f} of one (B, H, L, L) float32 (goal < '
                   f'1/{round(1 / GOAL_TEMP_FRACTION)})')
    cudnn = next((x for x in entries if x.length == e.length and
                  x.impl == 'cudnn' and x.median_ms is not None), None)
    if (e.label == 'iRPE-K' and e.impl == 'pallas' and cudnn is not None
        and e.median_ms is not None and e.length >= KERNEL_GOAL_LENGTH):
      ratio = e.median_ms / cudnn.median_ms
      verdict = 'HOLDS' if ratio <= KERNEL_GOAL_RATIO else 'MISSED'
      lines.append(f'[{verdict}] iRPE-K pallas at L={e.length}: {ratio:.2f}x '
                   f'plain cuDNN attention (goal <= {KERNEL_GOAL_RATIO}x)')
  return lines


def results_dict(entries: Sequence[Entry], args: Any,
                 budget: int, notes: Sequence[str]) -> Dict[str, Any]:
  """The measurements as plain data (what `--json` writes)."""
  fields = ('part', 'label', 'impl', 'length', 'grid', 'square_bytes',
            'compile_s', 'temp_bytes', 'io_bytes', 'skipped', 'median_ms',
            'min_ms', 'times_ms')
  return {
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__,
      'budget_bytes': budget, 'part': args.part, 'notes': list(notes),
      'revision': _revision(),
      'shapes': dict(batch=args.batch, heads=args.heads,
                     head_dim=args.head_dim, block_q=args.block_q,
                     block_k=args.block_k,
                     dtype=jnp.dtype(args.dtype).name),
      'impls': list(args.impls),
      'entries': [{f: getattr(e, f) for f in fields} for e in entries],
  }


COMMAND = cli.Command('python -m experiments.benchmarks.bench_flash', __doc__)
flags.DEFINE_enum('part', 'attention', ('attention', 'detr', 'all'),
                  'what to measure', flag_values=COMMAND.flags)
flags.DEFINE_list('lengths', None,
                  'L to measure; each moves to the nearest 1 + side^2 '
                  f'(default {",".join(map(str, LENGTHS))})',
                  flag_values=COMMAND.flags)
flags.DEFINE_list('attention', None,
                  "variants, of 'iRPE-K', 'iRPE-QKV', 'plain' (default all; "
                  "--quick: iRPE-QKV and plain, which have q, k and v terms)",
                  flag_values=COMMAND.flags)
flags.DEFINE_list('impls', None,
                  f'implementations, of {", ".join(IMPLS)} (default: those '
                  "this platform runs: no 'cudnn' off GPU, no 'pallas' on "
                  "CPU but with --quick)", flag_values=COMMAND.flags)
flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'),
                  'q, k, v and cotangent dtype (the tables stay float32)',
                  flag_values=COMMAND.flags)
flags.DEFINE_integer('batch', 1, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('heads', 8, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('head_dim', 32, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('block_q', None,
                     "queries per block (default the library's, 128)",
                     flag_values=COMMAND.flags)
flags.DEFINE_integer('block_k', None,
                     "keys per block (default the library's, 128)",
                     flag_values=COMMAND.flags)
flags.DEFINE_integer('repeats', 5, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('warmup', 1, '', flag_values=COMMAND.flags)
flags.DEFINE_integer('seed', 0, '', flag_values=COMMAND.flags)
flags.DEFINE_float('max_gb', None,
                   'memory a program may use (default 80% of the free host '
                   'or device memory)', flag_values=COMMAND.flags)
flags.DEFINE_string('detr_rpe', DETR_RPE, '', flag_values=COMMAND.flags)
flags.DEFINE_string('json', None,
                    'also write the measurements as JSON to this path',
                    flag_values=COMMAND.flags)
flags.DEFINE_bool('quick', False,
                  'tiny shapes, one repeat, fewer variants (no iRPE-K, no '
                  'plain DETR): a smoke run (seconds)',
                  flag_values=COMMAND.flags)


def parse_args(argv: Sequence[str]) -> Any:
  """Command-line flags; `--quick` shrinks every size for a smoke run."""
  args = COMMAND.namespace(argv)
  labels = sorted({label for label, _, _ in ATTENTION_VARIANTS})
  if args.lengths is None:
    args.lengths = QUICK_LENGTHS if args.quick else LENGTHS
  try:
    args.lengths = tuple(int(x) for x in args.lengths)
  except ValueError:
    sys.exit(f'error: --lengths must be comma-separated integers, got '
             f'{",".join(args.lengths)!r}.')
  if not args.lengths or min(args.lengths) < 2:
    sys.exit('error: --lengths needs integers of at least 2.')
  args.attention = tuple(args.attention or (
      ('iRPE-QKV', 'plain') if args.quick else labels))
  unknown = sorted(set(args.attention) - set(labels))
  if unknown or not args.attention:
    sys.exit(f'error: --attention takes labels of {labels}, got '
             f'{",".join(args.attention)!r}.')
  backend = jax.default_backend()
  args.impls = tuple(args.impls or [
      i for i in IMPLS if not (i == 'cudnn' and backend != 'gpu') and
      not (i == 'pallas' and backend == 'cpu' and not args.quick)])
  unknown = sorted(set(args.impls) - set(IMPLS))
  if unknown or not args.impls:
    sys.exit(f'error: --impls takes names of {list(IMPLS)}, got '
             f'{",".join(args.impls)!r}.')
  args.dtype = jnp.dtype(args.dtype)
  args.detr_grid, args.detr_valid_width = DETR_GRID, DETR_VALID_WIDTH
  args.detr_batch, args.detr_heads, args.detr_dim, args.detr_ffn = (
      2, 8, 256, 2048)
  if args.quick:
    args.heads, args.head_dim, args.repeats, args.warmup = 2, 8, 1, 1
    args.block_q = args.block_q or 8
    args.block_k = args.block_k or 8
    args.detr_grid, args.detr_valid_width = (4, 5), 3
    args.detr_heads, args.detr_dim, args.detr_ffn = 2, 16, 32
  return args


def _revision() -> str:
  """The checkout's commit (and whether it has local changes), if any."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    run = lambda *a: subprocess.run(['git', *a], cwd=here, check=True,
                                    capture_output=True, text=True).stdout
    dirty = run('status', '--porcelain', '--untracked-files=no').strip()
    return run('rev-parse', '--short', 'HEAD').strip() + (
        ' + local changes' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv: Sequence[str] = ()) -> int:
  args = parse_args(argv)
  budget = memory_budget(args.max_gb)
  device = jax.devices()[0]
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'device: {device.device_kind} ({jax.default_backend()}), '
        f'{os.cpu_count()} cores, load average {load}; jax {jax.__version__}'
        f'; memory budget {budget / GiB:.1f} GB; commit {_revision()}')
  print(f'fwd+bwd median of {args.repeats} after {args.warmup} warm-up; '
        f'blockwise blocks {args.block_q or "default"} x '
        f'{args.block_k or "default"}')
  entries, notes = [], []
  if args.part in ('attention', 'all'):
    part_entries, part_notes = run_attention(args, budget)
    entries, notes = entries + part_entries, notes + part_notes
  if args.part in ('detr', 'all'):
    part_entries, part_notes = run_detr(args, budget)
    entries, notes = entries + part_entries, notes + part_notes
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'\nload average at the end: {load}')
  for line in notes + goal_lines(entries):
    print(line)
  print()
  print(markdown_table(entries))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results_dict(entries, args, budget, notes), f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
