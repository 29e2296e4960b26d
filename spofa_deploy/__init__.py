"""spofa-deploy: SPOFA heterogeneous distillation, export and benchmarking."""
__version__ = "0.1.0"

from .artifacts import load_model, load_student  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["__version__", "load_model", "load_student", "UserError"]
