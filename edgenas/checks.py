"""Config values checked before any work: one line that names the field and says what it must be.

A NaN or Inf learning rate, penalty weight or temperature passes every `x < 0` / `x > 0` test in one direction or
the other and only shows as a diverged run minutes later; `number` refuses it, and a wrong type, up front.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping


def is_int(value) -> bool:
  """An integer, and not a bool (which Python counts as one)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def number(section: Mapping[str, Any], key: str, where: str, error: type[Exception], *, integer: bool = False,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           default: Any = None, why: str = "") -> Any:
  """`section[key]` if it is a finite number (an integer when `integer`) within the bounds, else `error` naming
  `{where}.{key}` (and `why`, where a bound needs explaining). A missing key is an error unless `default` is
  given (then the default is returned)."""
  name = f"{where}.{key}"
  if key not in section:
    if default is None:
      raise error(f"{name} is missing")
    return default
  value = section[key]
  kind = "an integer" if integer else "a number"
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or (integer and not isinstance(value, numbers.Integral))):
    raise error(f"{name} must be {kind}, got {value!r}")
  if not math.isfinite(value):
    raise error(f"{name} must be a finite number, got {value!r}")
  low = None if ge is None and gt is None else ("[", ge) if ge is not None else ("(", gt)
  high = None if le is None and lt is None else ("]", le) if le is not None else (")", lt)
  if ((ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le)
      or (lt is not None and value >= lt)):
    if low and high:
      bounds = f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low:
      bounds = f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    else:
      bounds = f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
    raise error(f"{name} must be {kind} {bounds}{f' ({why})' if why else ''}, got {value!r}")
  return value


def choice(section: Mapping[str, Any], key: str, where: str, error: type[Exception], options) -> Any:
  """`section[key]` if it is one of `options`, else `error` naming `{where}.{key}` and listing them."""
  value = section.get(key)
  if value not in tuple(options):
    raise error(f"{where}.{key} must be one of {', '.join(map(repr, options))}, got {value!r}")
  return value


def flag(section: Mapping[str, Any], key: str, where: str, error: type[Exception], default: bool) -> bool:
  """`section[key]` (or `default` when absent) if it is a bool, else `error` naming `{where}.{key}`."""
  value = section.get(key, default)
  if not isinstance(value, bool):
    raise error(f"{where}.{key} must be True or False, got {value!r}")
  return value
