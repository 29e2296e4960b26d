"""Our TensorRT logic, on a machine without TensorRT or a GPU.

TensorRT cannot be installed here, so these tests replace the `tensorrt` module with a small
fake (`_FakeTRT`) that only records what our code asks of it: the network and builder flags per
TensorRT version, what happens to the timing cache, and how often the execution context is
touched. The fake does not build or run anything; it checks OUR decisions (which flags, which
fallbacks, which calls per iteration), not TensorRT's behaviour. Real engines are built and run
by the `trt`/`gpu` tests in tests/test_export.py, which skip here.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import export.tensorrt as trt_export
import export.tensorrt.build as trt_build
import export.tensorrt.trt as trt_runner
from export.artifact import Artifact, BatchProfile
from export.runner import Runner

SHAPE = (3, 8, 8)
CLASSES = 10


class _Cache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return b"serialized:" + self.data


class _Config:
    """IBuilderConfig stand-in. `cache_mode` says how a non-empty cache buffer is received:
    ok | none (TensorRT logs and returns None) | raise | foreign (set_timing_cache returns False);
    `empty_fails` makes even an empty cache impossible."""

    def __init__(self, rec: dict, cache_mode: str, empty_fails: bool):
        self.rec, self.cache_mode, self.empty_fails, self.cache = rec, cache_mode, empty_fails, None

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        self.rec["builder_flags"].append(flag)

    def add_optimization_profile(self, profile):
        pass

    def create_timing_cache(self, data: bytes):
        if not data:
            return None if self.empty_fails else _Cache(b"")
        if self.cache_mode == "none":
            return None
        if self.cache_mode == "raise":
            raise RuntimeError("Serialization assertion magicTagRead == kMAGIC_TAG failed")
        return _Cache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.rec["set_cache"].append(cache)
        if cache is None:
            raise TypeError("set_timing_cache(): incompatible function arguments")  # what pybind does
        if self.cache_mode == "foreign" and cache.data:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Context:
    """IExecutionContext stand-in that counts calls."""

    def __init__(self):
        self.calls = {"set_input_shape": 0, "set_tensor_address": 0, "execute_async_v3": 0}
        self.addresses: dict[str, int] = {}
        self.batch = None
        self.streams: set[int] = set()

    def set_input_shape(self, name, shape):
        self.calls["set_input_shape"] += 1
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        return (self.batch, CLASSES)

    def set_tensor_address(self, name, ptr):
        self.calls["set_tensor_address"] += 1
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        self.calls["execute_async_v3"] += 1
        self.streams.add(stream)
        return True


class _Engine:
    names = ["images", "logits"]
    num_io_tensors = 2

    def __init__(self, trt):
        self.trt, self.context = trt, _Context()

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "images" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def get_tensor_shape(self, name):
        return (-1, *SHAPE) if name == "images" else (-1, CLASSES)

    def get_tensor_profile_shape(self, name, profile):
        return [(1, *SHAPE), (4, *SHAPE), (8, *SHAPE)]

    def create_execution_context(self):
        return self.context


def _fake_trt(version: str, cache_mode: str = "ok", empty_fails: bool = False) -> SimpleNamespace:
    """A `tensorrt` module stand-in of `version`; `.rec` records what the build asked for."""
    major = int(version.split(".")[0])
    rec = {"network_flags": None, "builder_flags": [], "set_cache": []}
    # TensorRT 11 has no precision builder flags: a getattr on them fails as it would there.
    flags = SimpleNamespace() if major >= 11 else SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8")
    trt = SimpleNamespace(
        __version__=version, rec=rec, BuilderFlag=flags,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0 if major >= 11 else 1),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None}),
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        DataType=SimpleNamespace(FLOAT="FLOAT", HALF="HALF"),
    )
    network = SimpleNamespace(get_input=lambda i: SimpleNamespace(name="images", shape=(-1, *SHAPE)))

    def create_network(flags):
        rec["network_flags"] = flags
        return network

    parsers = []  # alive (not yet collected) while the engine builds: they own the network's weights

    def build(net, config):
        rec["parsers_alive_at_build"] = sum(1 for p in parsers if p() is not None)
        return b"plan"

    class Parser:
        def __init__(self, net, logger):
            import weakref

            self.num_errors = 0
            parsers.append(weakref.ref(self))

        def parse_from_file(self, path):
            return True

    trt.Builder = lambda logger: SimpleNamespace(
        create_network=create_network,
        create_builder_config=lambda: _Config(rec, cache_mode, empty_fails),
        create_optimization_profile=lambda: SimpleNamespace(set_shape=lambda *a: None),
        build_serialized_network=build)
    trt.OnnxParser = Parser
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: _Engine(trt))
    return trt


@pytest.fixture
def use_trt(monkeypatch):
    """Install a fake TensorRT (and a pretend H100) for one test: `use_trt(version, ...)`."""

    def install(version: str, *, autocast: bool = True, **kw) -> SimpleNamespace:
        trt = _fake_trt(version, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        trt_build.trt_version.cache_clear()
        monkeypatch.setattr(trt_build, "_autocast_available", lambda: autocast)
        monkeypatch.setattr(trt_build, "require_gpu", lambda: None)
        h100 = {"gpu": "NVIDIA H100", "compute_capability": "9.0"}
        monkeypatch.setattr(trt_build, "gpu_info", lambda device=0: h100)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        return trt

    yield install
    trt_build.trt_version.cache_clear()  # the fake version must not outlive the test


def _build(tmp_path: Path, precision: str, cache: Path | None = None) -> dict:
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"onnx")
    return trt_export.build_engine(onnx_file, tmp_path / "m.engine", precision, BatchProfile.dynamic_range(1, 4, 8),
                                   timing_cache=cache)


# ----------------------------------------------------------------------------- version -> flags

STRONG_10 = 1 << 1  # STRONGLY_TYPED is enum value 1 on TensorRT 10 (EXPLICIT_BATCH is 0)


@pytest.mark.parametrize("version, autocast, precision, net_flags, builder_flags, onnx_prec", [
    # before 10.12: weakly typed, precision from the builder flags
    ("10.3.0", True, "fp32", 0, [], "fp32"),
    ("10.3.0", True, "fp16", 0, ["FP16"], "fp32"),
    ("10.3.0", True, "bf16", 0, ["BF16"], "fp32"),
    ("10.3.0", True, "int8", 0, ["INT8", "FP16"], "int8"),  # the Q/DQ graph's unquantized layers may run fp16
    # 10.12+: flags deprecated -> strongly typed like 11.x (fp16/bf16 when AutoCast can write the ONNX)
    ("10.12.0.36", True, "fp32", STRONG_10, [], "fp32"),
    ("10.12.0.36", True, "fp16", STRONG_10, [], "fp16"),
    ("10.16.1.11", True, "bf16", STRONG_10, [], "bf16"),
    ("10.12.0.36", True, "int8", STRONG_10, [], "int8"),
    ("10.12.0.36", False, "fp16", 0, ["FP16"], "fp32"),  # no ModelOpt: the deprecated flag still works
    ("10.12.0.36", False, "int8", STRONG_10, [], "int8"),  # Q/DQ needs no AutoCast
    # 11.x: always strongly typed; the deprecated STRONGLY_TYPED flag is not passed
    ("11.0.0", True, "fp16", 0, [], "fp16"),
    ("11.4.1", True, "bf16", 0, [], "bf16"),
    ("11.0.0", True, "int8", 0, [], "int8"),
    ("11.0.0", False, "fp32", 0, [], "fp32"),
])
def test_flags_per_tensorrt_version(use_trt, tmp_path, version, autocast, precision, net_flags, builder_flags,
                                    onnx_prec):
    trt = use_trt(version, autocast=autocast)
    assert trt_export.onnx_precision_for(precision) == onnx_prec
    meta = _build(tmp_path, precision)
    assert trt.rec["network_flags"] == net_flags
    assert trt.rec["builder_flags"] == builder_flags
    assert trt.rec["parsers_alive_at_build"] == 1
    assert meta["strongly_typed"] == (net_flags != 0 or version.startswith("11."))
    assert meta["warnings"] == []


# ----------------------------------------------------------------------------- timing cache

@pytest.mark.parametrize("mode", ["none", "raise", "foreign"])
def test_bad_timing_cache_falls_back_to_an_empty_one(use_trt, tmp_path, mode):
    trt = use_trt("10.16.1", cache_mode=mode)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage from another machine")
    meta = _build(tmp_path, "fp16", cache)  # no exception: the build goes on
    assert None not in trt.rec["set_cache"], "set_timing_cache must never get None (a pybind TypeError)"
    assert trt.rec["set_cache"][-1].data == b""  # the empty cache is the one attached
    assert len(meta["warnings"]) == 1 and "ignored the TensorRT timing cache" in meta["warnings"][0]
    assert cache.read_bytes() == b"serialized:"  # the damaged file is replaced by the fresh cache


def test_good_timing_cache_is_used_and_saved(use_trt, tmp_path):
    trt = use_trt("11.0.0")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"entries")
    meta = _build(tmp_path, "fp32", cache)
    assert [c.data for c in trt.rec["set_cache"]] == [b"entries"] and meta["warnings"] == []
    assert cache.read_bytes() == b"serialized:entries"
    (tmp_path / "new").mkdir()
    _build(tmp_path, "fp32", tmp_path / "new" / "t.cache")  # no file yet: an empty cache, then saved
    assert (tmp_path / "new" / "t.cache").read_bytes() == b"serialized:"


def test_no_timing_cache_at_all_still_builds(use_trt, tmp_path):
    use_trt("10.3.0", cache_mode="none", empty_fails=True)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage")
    meta = _build(tmp_path, "fp32", cache)
    assert (tmp_path / "m.engine").read_bytes() == b"plan"
    assert any("built without one" in w for w in meta["warnings"])
    assert cache.read_bytes() == b"garbage"  # nothing to save over it


# ----------------------------------------------------------------------------- runtime binding

def _engine(use_trt, tmp_path) -> trt_export.TrtEngine:
    use_trt("10.16.1")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    return trt_export.TrtEngine(engine)


def test_trtengine_binds_once_per_batch(use_trt, tmp_path):
    r = _engine(use_trt, tmp_path)
    ctx = r.context
    assert r.batch == {"min": 1, "opt": 4, "max": 8}
    x4 = torch.zeros(4, *SHAPE)  # CPU tensors stand in for device memory: only addresses matter here
    out = r.bind(x4)
    for _ in range(100):
        r.enqueue(7)
        assert r.bind(x4) is out  # same buffer, nothing re-set
    assert ctx.calls == {"set_input_shape": 1, "set_tensor_address": 2, "execute_async_v3": 100}
    assert ctx.addresses == {"images": x4.data_ptr(), "logits": out.data_ptr()} and out.shape == (4, CLASSES)
    assert ctx.streams == {7}

    x8 = torch.zeros(8, *SHAPE)
    out8 = r.bind(x8)  # a new batch: shape, output and input addresses set once more
    assert ctx.calls["set_input_shape"] == 2 and out8.shape == (8, CLASSES)
    assert r.bind(torch.zeros(4, *SHAPE)) is out  # back to 4: its buffer is reused, not reallocated
    assert ctx.calls["set_input_shape"] == 3 and ctx.addresses["logits"] == out.data_ptr()


def test_trt_runner_timed_call_only_enqueues(use_trt, tmp_path, monkeypatch):
    r = _engine(use_trt, tmp_path)  # installs the fake; TrtRunner builds its own TrtEngine on it
    monkeypatch.setattr(trt_runner, "cuda_skip_reason", lambda: None)
    art = Artifact(path=tmp_path / "m.engine", format="trt", precision="fp16", size_bytes=4, batch_range=(1, 4),
                   meta={"model": "m", "num_classes": CLASSES, "img_size": SHAPE[1], "in_chans": SHAPE[0]})
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: SimpleNamespace(cuda_stream=11))
    er = trt_runner.TrtRunner(art)
    assert er._engine is None  # made, not loaded: the engine loads as the runner is activated
    er.activate()
    assert er.batch_range == (1, 8) and er._engine is not r  # the engine's own profile
    ctx = er._engine.context
    x_dev = torch.zeros(8, *SHAPE)
    compute, out = er._compute(x_dev, 11)
    before = dict(ctx.calls)
    for _ in range(50):
        compute()
    assert ctx.calls["execute_async_v3"] - before["execute_async_v3"] == 50
    assert ctx.calls["set_input_shape"] == before["set_input_shape"] == 1
    assert ctx.calls["set_tensor_address"] == before["set_tensor_address"] == 2
    assert ctx.addresses["logits"] == out.data_ptr() and ctx.streams == {11}
    er._engine.bind(torch.zeros(8, *SHAPE))  # something else ran the engine in between ...
    compute()  # ... so the timed call re-binds its own input once
    assert ctx.addresses["images"] == x_dev.data_ptr()
    assert ctx.calls["set_tensor_address"] == 4 and ctx.calls["set_input_shape"] == 1


# ----------------------------------------------------------------------------- Runner.logits

class _EchoRunner(Runner):
    """A runner of batch range lo..hi whose logits are the first pixels of each image (so order is checkable)."""

    def __init__(self, lo: int, hi: int):
        super().__init__(name="echo", backend="trt", precision="fp32", device="cpu", size_bytes=None,
                         input_shape=SHAPE, batch_range=(lo, hi))
        self.batches = []

    def _load(self):
        pass

    def _prepare(self, batch):
        raise NotImplementedError

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        assert self.batch_range[0] <= len(x) <= self.batch_range[1]
        self.batches.append(len(x))
        return x.flatten(1)[:, :CLASSES]


@pytest.mark.parametrize("lo, hi, expected", [(3, 3, [3, 3, 3]), (1, 8, [4, 3]), (4, 16, [4, 4]), (8, 8, [8])])
def test_logits_pad_to_the_batch_range_and_drop_the_padding(lo, hi, expected):
    """How an export's parity check runs an engine (or any runner) on any number of images."""
    images = np.random.default_rng(0).standard_normal((7, *SHAPE)).astype(np.float32)
    runner = _EchoRunner(lo, hi)
    out = runner.logits(images, chunk=4)
    np.testing.assert_array_equal(out, images.reshape(7, -1)[:, :CLASSES])
    assert runner.batches == expected and runner.active


# ----------------------------------------------------------------------------- profiles, TF32, CUDA graphs

def test_two_profiles_opt_1_and_the_large_batch_and_tf32_recorded(use_trt, tmp_path):
    trt = use_trt("11.0.0")
    trt.BuilderFlag.TF32 = "TF32"
    cleared = []
    real_config = trt.Builder(None).create_builder_config

    def config():
        c = real_config()
        c.clear_flag = cleared.append
        return c

    builder = trt.Builder(None)
    builder.create_builder_config = config
    trt.Builder = lambda logger: builder
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"onnx")
    meta = trt_export.build_engine(onnx_file, tmp_path / "m.engine", "fp32", BatchProfile.dynamic_range(1, 16, 256),
                                   tf32=False)
    assert [p["opt"] for p in meta["profiles"]] == [1, 256] and meta["profile_choice"].startswith("per batch")
    assert meta["tf32"] is False and cleared == ["TF32"]
    assert trt_build.profile_opts(BatchProfile.fixed(4)) == [4]


def test_engine_switches_to_the_nearest_profile(use_trt, tmp_path, monkeypatch):
    r = _engine(use_trt, tmp_path)
    switched = []
    r.context.set_optimization_profile_async = lambda i, stream: switched.append(i) or True
    r._opts = [1, 256]  # an engine of two profiles, as `build_engine` makes them
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=5))
    assert [r.profile_for(n) for n in (1, 8, 15, 17, 64, 256)] == [0, 0, 0, 1, 1, 1]
    r.bind(torch.zeros(1, *SHAPE))
    r.bind(torch.zeros(8, *SHAPE))
    assert switched == [] and r.profile == 0
    x = torch.zeros(64, *SHAPE)
    r.bind(x)
    assert switched == [1] and r.profile == 1 and r.context.addresses["images"] == x.data_ptr()


@pytest.mark.parametrize("capture_fails", [False, True])
def test_trt_runner_replays_a_cuda_graph_or_falls_back(monkeypatch, capture_fails):
    calls = []

    class Graph:
        def replay(self):
            calls.append("replay")

    @contextlib.contextmanager
    def graph(g, stream=None):
        yield  # the enqueue is captured (recorded, not run) ...
        if capture_fails:  # ... and the capture fails as it ends
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    runner = object.__new__(trt_runner.TrtRunner)
    timed = runner._graphed(lambda: calls.append("enqueue"), stream=None)
    timed()
    assert runner.cuda_graph is (not capture_fails)
    # The captured call, then the timed one: the plain enqueue again, or the graph's replay.
    assert calls == (["enqueue", "enqueue"] if capture_fails else ["enqueue", "replay"])


@pytest.mark.parametrize("passed", [False, True])
def test_an_fp32_engine_that_differs_from_pytorch_is_not_written(monkeypatch, tmp_path, passed):
    """Like an fp32 ONNX or .pt2: an fp32 engine is refused on its parity (reduced precision: the gate judges)."""
    from spofa_deploy.errors import UserError

    monkeypatch.setattr(trt_export, "build_engine", lambda *a, **k: {"tf32": True, "tensorrt": "10.3", "gpu": "H100"})
    monkeypatch.setattr(trt_export, "TrtRunner", lambda art: contextlib.nullcontext("engine runner"))
    parity = SimpleNamespace(passed=passed, top1_agreement=100.0 if passed else 40.0, n=64,
                             describe=lambda: "max abs err 3.1", flips=lambda: "", to_dict=lambda: {"passed": passed})
    installed = []
    job = SimpleNamespace(
        precision="fp32", result=SimpleNamespace(gate=None), dest=tmp_path / "student.engine",
        source=SimpleNamespace(path=tmp_path / "student.safetensors"), profile=BatchProfile.dynamic_range(1, 4, 8),
        options=SimpleNamespace(trt=SimpleNamespace(timing_cache=None, workspace_gib=1, tf32=True),
                                parity=SimpleNamespace(atol=1e-4, rtol=1e-4)),
        built=lambda *a, **k: None, parity=lambda run, where, tol=None: parity, install=installed.extend,
        judge=lambda *a: pytest.fail("an fp32 engine has no gate"), sidecar=lambda *a, **k: {})
    built = SimpleNamespace(path=tmp_path / "model.onnx", precision="fp32", extra={})
    if passed:
        trt_export._engine(job, built, tmp_path)
        assert [dest.name for _, dest, _ in installed] == ["student.onnx", "student.engine"]
    else:
        with pytest.raises(UserError, match="engine differs from PyTorch beyond tolerance: max abs err 3.1"):
            trt_export._engine(job, built, tmp_path)
        assert installed == []
