"""The runners of `spofa bench`, one per backend of `export.formats.FORMATS`, all of one shape (`Runner`).

    torch-eager, torch-compile, torch-cudagraph   TorchRunner (pytorch.py)
    ort-cpu, ort-cuda                             OrtRunner   (ort.py)
    trt                                           TrtRunner   (trt.py)
    aoti                                          Pt2Runner   (aoti.py)
"""
from .aoti import Pt2Runner
from .base import BackendUnavailable, Runner
from .ort import OrtRunner, ort_cuda_reason
from .pytorch import TORCH_BACKENDS, TORCH_PRECISIONS, TorchRunner, check_compile_mode, state_dict_bytes
from .trt import TrtRunner

__all__ = ["BackendUnavailable", "OrtRunner", "Pt2Runner", "Runner", "TORCH_BACKENDS", "TORCH_PRECISIONS",
           "TorchRunner", "TrtRunner", "check_compile_mode", "ort_cuda_reason", "state_dict_bytes"]
