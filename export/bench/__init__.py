"""`spofa bench`: latency and accuracy of a student artifact beside its teacher.

    run.py        entry points: run_bench (model files, `BenchOptions`), bench_models (in-memory models)
    target.py     what bench is given: the model file, its format and sidecar, checked (`Artifact`)
    teacher.py    the teacher to compare with, exported like the student and cached beside it
    variants.py   which (model, backend, precision) variants run, as `Candidate`s with their runners
    runners/      one `Runner` shape per backend: PyTorch, ONNX Runtime, TensorRT, AOTInductor
    timing.py     the timing method (`measure`, `TimingOptions`) and latency statistics
    loop.py       the interleaved timing rounds, accuracy through the runners, teacher pairing
    report.py     result records -> rich table, JSON, PNG

Import the submodules (`from export.bench.run import run_bench`); this package imports nothing.
"""
