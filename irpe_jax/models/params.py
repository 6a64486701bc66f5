"""The parameters a model expects, and a param tree checked against them.

A model owns the names, shapes and dtypes of its parameters (as big_vision's
`vit.load` does): `expected_params` gets them without initialising anything,
and `check_params` compares any param tree with them on Flax paths, so that
a tree is loaded whole or not at all. Checkpoint formats (`irpe_jax.convert`)
only map their names onto these paths.
"""

import functools
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Dict[str, Any]
Path = Tuple[str, ...]
Shape = Tuple[int, ...]
# How a param is named in errors: (Flax path, Flax shape) -> (name, shape).
Describe = Callable[[Path, Shape], Tuple[str, Shape]]


def example_inputs(model: nn.Module) -> Tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of inputs that `model.init` takes.

  The model's own `example_inputs()` (DETR: a small padded batch), else a
  `VisionTransformer`'s images at its `img_size`.
  """
  own = getattr(model, 'example_inputs', None)
  if callable(own):
    return tuple(own())
  size = model.img_size
  rows, cols = (size, size) if isinstance(size, int) else size
  return (jax.ShapeDtypeStruct((1, rows, cols, model.in_chans), jnp.float32),)



@functools.lru_cache(maxsize=64)
def _unoptimised_init(model: nn.Module, static: Tuple[Tuple[str, Any], ...]
                      ) -> Callable[..., Any]:
  return jax.jit(functools.partial(model.init, **dict(static)),
                 compiler_options={'xla_backend_optimization_level': 0})


def jitted_init(model: nn.Module) -> Callable[..., Any]:
  """`model.init`, jitted at XLA's lowest backend optimisation, per model.

  Initialisation runs once per run, so its speed does not matter, but its
  compile does: on CPU, LLVM's optimisation of JAX's threefry generator
  takes seconds per parameter shape, against a fraction of a second
  unoptimised (on this project's 2-core CPU, jax 0.12: a tiny DETR's init
  compiled in 65 s, now 17 s; a small ViT's in 15 s, now 5 s). The values
  are those of `model.init` within float32 rounding of the normal sampler (the
  integer random bits are the same). Compiled once per (hashable) model and
  non-array keyword arguments such as `train=False`, which stay static, so later
  runs in the process (tests, sweeps) compile nothing.

  Returns:
    A function called as `model.init`: `(rngs, *args, **kwargs)`. Called
    inside a trace (`jit`, `eval_shape`), it is `model.init` itself: the
    enclosing program's compile settings apply.
  """

  def init(*args, **kwargs):
    if any(isinstance(x, jax.core.Tracer)
           for x in jax.tree.leaves((args, kwargs))):
      return model.init(*args, **kwargs)
    arrays = {k: v for k, v in kwargs.items()
              if isinstance(v, (jax.Array, np.ndarray))}
    static = tuple(sorted((k, v) for k, v in kwargs.items()
                          if k not in arrays))
    return _unoptimised_init(model, static)(*args, **arrays)

  return init

def expected_variables(model: nn.Module) -> Dict[str, Params]:
  """Every collection of a model, as `jax.ShapeDtypeStruct` values.

  Nothing is initialised or allocated (`jax.eval_shape`).

  Returns:
    The variables,
    `{'params': ...}`, plus 'batch_stats' for DETR's frozen batch norm.
  """
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             *example_inputs(model))
  return flax.core.unfreeze(variables)


def expected_params(model: nn.Module) -> Params:
  """The params of a model, as `jax.ShapeDtypeStruct` values.

  Nothing is initialised or allocated (`jax.eval_shape`).

  Args:
    model: a `VisionTransformer` (its `img_size` sets the `pos_embed` grid)
      or a DETR.

  Returns:
    The nested `params` dict, with a `ShapeDtypeStruct` per leaf.
  """
  return expected_variables(model)['params']


def flax_name(path: Path, shape: Shape) -> Tuple[str, Shape]:
  """Names a param by its Flax path, `blocks_0/attn/qkv/kernel`."""
  return '/'.join(path), shape


def _flatten(params: Any, what: str) -> Dict[Path, Any]:
  if not isinstance(params, Mapping):
    raise TypeError(f'{what} must be a nested mapping of params, got '
                    f'{type(params).__name__}.')
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params))


def check_params(params: Mapping[str, Any],
                 expected: Union[nn.Module, Mapping[str, Any]], *,
                 describe: Describe = flax_name) -> Params:
  """Checks a param tree against a model's, and casts it to its dtypes.

  Args:
    params: the nested `params` dict (arrays or `jax.ShapeDtypeStruct`
      values); a `{'params': ...}` wrapper is accepted too.
    expected: a model (see `expected_params`; a model with several
      collections, DETR, is compared on its whole variables), or the params
      (or variables) it expects (arrays or `jax.ShapeDtypeStruct` values).
    describe: how errors name a param, `(path, shape) -> (name, shape)`;
      by default its Flax path and shape. A converter passes the names and
      layout of its file format.

  Returns:
    `params` with every array cast to the dtype of its expected param
    (`ShapeDtypeStruct` values are kept), nested as `expected`.

  Raises:
    ValueError: listing every missing, unexpected and wrongly shaped param
      (with a pointer to `resample_posemb` when only the `pos_embed` grid
      differs), if `params` does not fit.
  """
  if isinstance(expected, nn.Module):
    expected = expected_variables(expected)
    if set(expected) == {'params'}:
      expected = expected['params']
  want = _flatten(expected, 'expected')
  if (isinstance(params, Mapping) and set(params) == {'params'}
      and not any(path[0] == 'params' for path in want)):
    params = params['params']
  got = _flatten(params, 'params')
  shape = lambda x: tuple(np.shape(x))
  name = lambda path: describe(path, shape(want.get(path, got.get(path))))[0]
  missing = sorted(name(p) for p in want.keys() - got.keys())
  unexpected = sorted(name(p) for p in got.keys() - want.keys())
  wrong = []
  for p in sorted(got.keys() & want.keys()):
    if shape(got[p]) != shape(want[p]):
      label, got_shape = describe(p, shape(got[p]))
      wrong.append(f'{label}: checkpoint {got_shape}, model '
                   f'{describe(p, shape(want[p]))[1]}')
  wrong.sort()
  if missing or unexpected or wrong:
    lines = ['The params do not fit the model:']
    for title, items in (('missing', missing), ('unexpected', unexpected),
                         ('wrong shape', wrong)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items))
    old, new = got.get(('pos_embed',)), want.get(('pos_embed',))
    if (old is not None and new is not None and shape(old) != shape(new)
        and shape(old)[-1:] == shape(new)[-1:]):
      lines.append('  (for another resolution, resample pos_embed with '
                   'irpe_jax.models.resample_posemb)')
    raise ValueError('\n'.join(lines))
  return flax.traverse_util.unflatten_dict(
      {p: _cast(got[p], want[p].dtype) for p in want})


def _cast(value: Any, dtype: Any) -> Any:
  if isinstance(value, jax.ShapeDtypeStruct):
    return value
  if not hasattr(value, 'dtype') or not hasattr(value, 'astype'):
    value = np.asarray(value)
  return value if value.dtype == dtype else value.astype(dtype)
