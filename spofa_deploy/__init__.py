"""spofa-deploy: SPOFA heterogeneous distillation, export and benchmarking.

The Python API of the training half (docs/api.md); export and bench are in the `export` package:

    from spofa_deploy import distill, TeacherOptions
    from export import export_model, run_bench
"""
__version__ = "0.1.0"

from spofa_deploy.artifacts import load_model, load_student  # noqa: E402
from spofa_deploy.compare.config import CompareConfig, CompareResult  # noqa: E402
from spofa_deploy.compare.run import run_compare  # noqa: E402
from spofa_deploy.data.splits import DataOptions  # noqa: E402
from spofa_deploy.errors import UserError  # noqa: E402
from spofa_deploy.method.distillers import DistillConfig  # noqa: E402
from spofa_deploy.pipeline import DistillResult, distill  # noqa: E402
from spofa_deploy.teacher.stage import TeacherOptions, train_teacher  # noqa: E402
from spofa_deploy.train.loop import TrainConfig  # noqa: E402

__all__ = ["__version__", "load_model", "load_student", "UserError", "distill", "train_teacher", "run_compare",
           "DataOptions", "TeacherOptions", "TrainConfig", "DistillConfig", "DistillResult", "CompareConfig",
           "CompareResult"]
