"""Validation of user arguments, shared by every layer of the library.

Each check raises at trace time with a message that names the argument, the
value it got and what was expected. numpy scalars are accepted wherever Python
numbers are.
"""

import math
import numbers
from typing import Optional

import numpy as np


def check_int(name: str, value, minimum: int,
              maximum: Optional[int] = None) -> int:
  """Returns `value` as a Python int, checked to lie in `[minimum, maximum]`."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Integral, np.integer)):
    raise TypeError(f'{name} must be an int, got {value!r} '
                    f'({type(value).__name__}).')
  value = int(value)
  if value < minimum or (maximum is not None and value > maximum):
    upper = '' if maximum is None else f' and <= {maximum}'
    raise ValueError(f'{name} must be >= {minimum}{upper}, got {value}.')
  return value


def check_number(name: str, value, *, minimum: Optional[float] = None,
                 maximum: Optional[float] = None,
                 exclusive_minimum: bool = False) -> float:
  """Returns `value` as a finite Python float within the given bounds."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.floating, np.integer)):
    raise TypeError(f'{name} must be a real number, got {value!r} '
                    f'({type(value).__name__}).')
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f'{name} must be finite, got {value}.')
  if minimum is not None and (value <= minimum if exclusive_minimum
                              else value < minimum):
    relation = '>' if exclusive_minimum else '>='
    raise ValueError(f'{name} must be {relation} {minimum}, got {value}.')
  if maximum is not None and value > maximum:
    raise ValueError(f'{name} must be <= {maximum}, got {value}.')
  return value


def check_mask(mask, shape) -> None:
  """Raises unless `mask` is None, or boolean and broadcastable to `shape`.

  `shape` is `(B, H, Lq, Lk)`; True marks a (query, key) pair to attend.
  """
  if mask is None:
    return
  if mask.dtype != bool:
    raise TypeError(f'mask must be boolean (True = attend), got dtype '
                    f'{mask.dtype}.')
  shape = tuple(shape)
  if mask.ndim != 4 or any(m not in (1, t) for m, t in zip(mask.shape, shape)):
    raise ValueError(f'mask of shape {mask.shape} does not broadcast to '
                     f'(B, H, Lq, Lk) = {shape}; for key padding pass '
                     f'mask[:, None, None, :].')
