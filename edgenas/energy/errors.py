"""The one exception type of the energy and memory model."""


class EnergyModelError(ValueError):
  """A platform profile, lookup table, model file or query that the energy model cannot use.

  The message names the file (or input), the row or field, and what was expected.
  """
