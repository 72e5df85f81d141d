"""The exceptions of the on-target runner; every message names the target, tool, file or image involved."""


class DeviceError(RuntimeError):
  """A device build or emulator run that cannot be done as asked."""


class ToolchainMissingError(DeviceError):
  """A compiler, emulator or the TFLite Micro sources are not installed; the message names the Debian package
  or the variable to set."""


class BuildError(DeviceError):
  """Compiling or linking a device program failed; the message names the log file that was kept."""


class EmulatorTimeoutError(DeviceError):
  """The emulated program did not finish within its time limit."""


class MismatchError(DeviceError):
  """The device's int8 outputs differ from the host TFLite Micro interpreter's; names the image and the first
  differing output."""
