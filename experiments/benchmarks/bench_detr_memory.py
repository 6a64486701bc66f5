"""Peak memory of a DETR encoder layer, with and without iRPE.

At detection resolutions (an 800x1067 image gives a 25x34 feature map,
L = 850; 1333x1333 gives 42x42, L = 1764) this compiles the forward and
backward of one encoder layer of the release's DETR (B=2 images as the
release trains per GPU, 8 heads, 256 features, FFN 2048) and reads XLA's
memory analysis of the compiled program:

- 'plain': DETR's encoder layer;
- 'irpe': with contextual product iRPE on keys (`rpe-2.0-product-ctx-1-k`,
  81 buckets), computed as the paper's Sec. 3.2 (`impl='auto'`);
- 'irpe naive': the same through `impl='naive'`, which materialises the
  `(L, L, D)` encodings as the release's PyTorch path does.

For each it reports the temporary bytes XLA allocates (the peak beyond
arguments and outputs) and the largest array in the compiled program, in
units of the `(B, H, L, L)` attention weights. Nothing is run: compile only.

  python -m experiments.benchmarks.bench_detr_memory
  python -m experiments.benchmarks.bench_detr_memory --quick  # tiny, seconds
"""

import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib import cli
from irpe_jax import config as config_lib
from irpe_jax.models import detr_transformer

GRIDS = ((25, 34), (42, 42))
QUICK_GRIDS = ((10, 12),)
# label -> (enc_rpe2d, impl)
VARIANTS = {
    'plain': ('', 'auto'),
    'irpe': ('rpe-2.0-product-ctx-1-k', 'auto'),
    'irpe naive': ('rpe-2.0-product-ctx-1-k', 'naive'),
}
_ARRAY = re.compile(r'\b(?:pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|'
                    r'f64)\[([\d,]*)\]')


def largest_array(hlo: str) -> int:
  """Elements of the largest array an HLO text names (arguments included)."""
  return max(int(np.prod([int(d) for d in dims.split(',') if d]))
             for dims in _ARRAY.findall(hlo))


def encoder_layer_grad(rpe: str, impl: str, batch: int, height: int,
                       width: int, heads: int = 8, dim: int = 256,
                       dim_feedforward: int = 2048
                       ) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
  """`(fn, shapes)`: gradients of one encoder layer w.r.t. params and input.

  The loss is `sum(out * cotangent)` with the cotangent an argument, so
  that XLA cannot fold the backward pass away.
  """
  layer = detr_transformer.EncoderLayer(
      num_heads=heads, dim_feedforward=dim_feedforward,
      rpe_config=config_lib.parse_rpe_string(rpe) if rpe else None,
      impl=impl)
  length = height * width
  src = jax.ShapeDtypeStruct((batch, length, dim), jnp.float32)
  padding = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
  variables = jax.eval_shape(
      lambda src, padding: layer.init(jax.random.key(0), src, src, padding,
                                      height, width), src, padding)

  def grads(variables, src, pos, padding, cotangent):
    def loss(variables, src):
      out = layer.apply(variables, src, pos, padding, height, width)
      return jnp.sum(out * cotangent)
    return jax.grad(loss, argnums=(0, 1))(variables, src)

  return grads, (variables, src, src, padding, src)


def measure(rpe: str, impl: str, batch: int, height: int, width: int,
            **dims: int) -> Dict[str, float]:
  """Compiles one layer's forward+backward and reads its memory analysis."""
  fn, shapes = encoder_layer_grad(rpe, impl, batch, height, width, **dims)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*shapes).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  heads = dims.get('heads', 8)
  attention = batch * heads * (height * width) ** 2
  return {
      'temp_mib': stats.temp_size_in_bytes / 2 ** 20,
      'largest_vs_attention': largest_array(compiled.as_text()) / attention,
      'attention_mib': attention * 4 / 2 ** 20,
      'compile_s': compile_s,
  }


COMMAND = cli.Command(
    'python -m experiments.benchmarks.bench_detr_memory', __doc__)
flags.DEFINE_integer('batch', 2, '', flag_values=COMMAND.flags)
flags.DEFINE_bool(
    'quick', False, 'a 10x12 map and small layers: a smoke run',
    flag_values=COMMAND.flags)
flags.DEFINE_string(
    'variants', ','.join(VARIANTS), f'comma-separated, of {list(VARIANTS)}',
    flag_values=COMMAND.flags)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = COMMAND.namespace(argv)
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    cli.usage_error(f'unknown variants {unknown}; choose from {list(VARIANTS)}')
  grids = QUICK_GRIDS if args.quick else GRIDS
  dims = dict(heads=2, dim=16, dim_feedforward=32) if args.quick else {}
  sizes = dims or '8 heads, 256 features, FFN 2048'
  print(f'jax {jax.__version__}, {jax.default_backend()} '
        f'({jax.devices()[0].device_kind}); one DETR encoder layer, forward '
        f'+ backward, batch {args.batch}, {sizes}.')
  print('\n| map | L | variant | temp MiB | largest array / (B,H,L,L) | '
        '(B,H,L,L) MiB | compile s |')
  print('|---|---|---|---|---|---|---|')
  rows = []
  for height, width in grids:
    for label in variants:
      rpe, impl = VARIANTS[label]
      row = dict(height=height, width=width, variant=label,
                 **measure(rpe, impl, args.batch, height, width, **dims))
      rows.append(row)
      print(f'| {height}x{width} | {height * width} | {label} | '
            f'{row["temp_mib"]:.0f} | {row["largest_vs_attention"]:.2f} | '
            f'{row["attention_mib"]:.0f} | {row["compile_s"]:.1f} |',
            flush=True)
  return rows


if __name__ == '__main__':
  main(sys.argv[1:])
