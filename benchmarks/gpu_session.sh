#!/usr/bin/env bash
# Everything that needs a GPU, in one call, most important first; logs and JSON under $OUT.
#   run on the lent GPU machine from the repository root:  bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/spofa-gpu}; mkdir -p "$OUT"; L=$OUT/gpu.log
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s, $(date +%T))" | tee -a "$L"
  local t0=$SECONDS
  timeout "$secs" "$@" >>"$L" 2>&1; local rc=$?
  echo "=== $name rc=$rc wall=$((SECONDS - t0))s" | tee -a "$L"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$L"
python3 -c "import torch, timm, onnx, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'onnx', onnx.__version__, 'ort', ort.__version__, ort.get_available_providers())" | tee -a "$L"

step main 200 python3 -m cli.main distill --teacher vit_b --student mobilenetv3 --out runs/gpu-main
cp runs/gpu-main/student.json "$OUT/" 2>/dev/null
cat runs/teachers/*/metrics.jsonl runs/gpu-main/metrics.jsonl > "$OUT/metrics.jsonl" 2>/dev/null
step distill_step 90 python3 benchmarks/distill_step.py --json "$OUT/distill_step.json"
step bench_eager_graph 70 python3 benchmarks/bench_models.py --backends torch-eager,torch-cudagraph --json "$OUT/bench_eager_graph.json"
step gpu_tests 60 python3 -m pytest -q -m gpu tests -p no:cacheprovider
step ddp_nccl 45 python3 -m torch.distributed.run --nproc-per-node 1 --standalone -m cli.main distill \
  --teacher vit_b --student mobilenetv3 --epochs 1 --out runs/gpu-ddp
step bench_run 40 python3 -m cli.main bench runs/gpu-main/student.safetensors --backend torch-eager,torch-cudagraph \
  --batch 1,64 --min-s 1 --warmup-s 0.3 --json "$OUT/bench_run.json"
step bench_compile 120 python3 benchmarks/bench_models.py --backends torch-compile --json "$OUT/bench_compile.json"
echo "=== done $(date +%T)" | tee -a "$L"
