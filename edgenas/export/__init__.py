"""Export to TensorFlow Lite Micro: int8 `.tflite`, checked in the TFLM interpreter, C sources and build files
for Cortex-M (CMSIS-NN) and RISC-V, and `report.json`.

    from edgenas import export
    report = export.export_workdir("runs/retrain", ["stm32l4r5_tflm"])
    report = export.export_model(arch, variables, dataset, "out/export", ["stm32l4r5_tflm"], quant_state=ranges)

Importing this package does not import TensorFlow, LiteRT or tflite-micro: they load when a model is converted
or run, and a missing one raises MissingExportDependencyError naming `pip install -e ".[export]"`.
"""
from edgenas.export.errors import (AccuracyError, BudgetError, ExportError, MissingExportDependencyError,
                                   UnsupportedOpError)
from edgenas.export.exporter import export_model, export_workdir

__all__ = ["export_model", "export_workdir", "ExportError", "BudgetError", "UnsupportedOpError", "AccuracyError",
           "MissingExportDependencyError"]
