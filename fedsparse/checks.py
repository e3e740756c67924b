"""Argument checks shared by every layer: one message format for a bad choice or count.

Example:
  >>> check_choice('ties', 'index', ('index', 'keep'))
  >>> check_choice('ties', 'first', ('index', 'keep'))
  Traceback (most recent call last):
  ...
  ValueError: Unknown ties 'first'; valid: index, keep.
"""

from typing import Any

__all__ = ['check_choice', 'check_int']


def check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
  """Raises unless ``value`` is one of ``valid``, naming the valid choices."""
  if value not in valid:
    raise ValueError(f'Unknown {name} {value!r}; valid: {", ".join(valid)}.')


def check_int(name: str, value: Any, low: int) -> None:
  """Raises unless ``value`` is an int (not a bool) of at least ``low``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f'{name} must be an integer >= {low}, got {value!r}.')
