"""Export a trained model (ONNX, TensorRT, `.pt2`) and bench it beside its teacher: the Python API of the
deployment half (docs/api.md).

    from export import export_model, run_bench, BenchOptions
"""
from .bench.report import BenchReport
from .bench.run import BenchOptions, run_bench
from .exporter import ExportResult, export_model

__all__ = ["export_model", "ExportResult", "run_bench", "BenchOptions", "BenchReport"]
