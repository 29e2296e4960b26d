"""Export a trained model (ONNX, TensorRT, `.pt2`) and bench it beside its teacher: the Python API of the
deployment half (docs/api.md).

    from export import export_model, ExportOptions, run_bench, BenchOptions
"""
from .artifact import Artifact, describe
from .bench.plan import BenchOptions, BenchPlan, plan_bench
from .bench.report import BenchReport
from .bench.run import measure, run_bench
from .exporter import ExportResult, export_model
from .options import ExportOptions, GateOptions, Int8Options, ParityOptions, TrtOptions

__all__ = ["Artifact", "BenchOptions", "BenchPlan", "BenchReport", "ExportOptions", "ExportResult", "GateOptions",
           "Int8Options", "ParityOptions", "TrtOptions", "describe", "export_model", "measure", "plan_bench",
           "run_bench"]
