"""The exceptions of the exporter; every message names the file, budget, operator or package involved."""


class ExportError(ValueError):
  """A model that cannot be exported as asked (conversion, verification or an input file)."""


class BudgetError(ExportError):
  """The exported model needs more SRAM or flash than a target platform has."""


class UnsupportedOpError(ExportError):
  """The converted model uses an operator (or a tensor type) that TFLite Micro cannot run."""


class AccuracyError(ExportError):
  """The int8 model does not reproduce the float model closely enough."""


class MissingExportDependencyError(ExportError):
  """TensorFlow, LiteRT or tflite-micro is not installed."""


INSTALL_HINT = 'pip install -e ".[export]"'


def require(module: str, purpose: str):
  """Imports `module` for `purpose`, or raises with the install command (the `[export]` extra holds them)."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingExportDependencyError(
        f"exporting needs {module.split('.')[0]} for {purpose}, which is not installed ({e}); install the export "
        f"extra: {INSTALL_HINT}") from None
