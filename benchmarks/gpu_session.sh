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

# Digits defaults sweep: teacher batch size, student lr / batch size, feature weight (20 epochs each).
D="python3 -m cli.main"
step teacher_b128 60 $D teacher --teacher vit_b
step teacher_b32 60 $D teacher --teacher vit_b --batch-size 32 --out runs/t32
TA=runs/teachers/vit_base_patch16_224-digits-32px/teacher.safetensors; TB=runs/t32/teacher.safetensors
step none_b128_lr2e-3 45 $D distill --teacher-ckpt $TA --method none --out runs/s-none-b128-2e-3
step none_b128_lr5e-4 45 $D distill --teacher-ckpt $TA --method none --lr 5e-4 --out runs/s-none-b128-5e-4
step none_b32_lr1e-3 45 $D distill --teacher-ckpt $TA --method none --batch-size 32 --lr 1e-3 --out runs/s-none-b32-1e-3
step spofa_b32_lr1e-3_f1 50 $D distill --teacher-ckpt $TB --batch-size 32 --lr 1e-3 --out runs/s-spofa-b32-1e-3-f1
step spofa_b32_lr1e-3_f0.1 50 $D distill --teacher-ckpt $TB --batch-size 32 --lr 1e-3 --feat-weight 0.1 --out runs/s-spofa-b32-1e-3-f01
step spofa_b128_default 50 $D distill --teacher-ckpt $TA --out runs/s-spofa-default
python3 - <<'PY' | tee -a "$L"
import json, glob
for f in sorted(glob.glob("runs/*/student.json") + glob.glob("runs/t32/teacher.json") + glob.glob("runs/teachers/*/teacher.json")):
    m = json.load(open(f)); print(f"{f:60s} top1 {m.get('top1', 0):6.2f} saved {m.get('saved')} epoch {m.get('epoch')}")
PY
cat runs/*/metrics.jsonl runs/teachers/*/metrics.jsonl > "$OUT/metrics_all.jsonl" 2>/dev/null
step distill_step 80 python3 benchmarks/distill_step.py --json "$OUT/distill_step.json"
step bench_eager_graph 60 python3 benchmarks/bench_models.py --backends torch-eager,torch-cudagraph --json "$OUT/bench_eager_graph.json"
step gpu_tests 60 python3 -m pytest -q -m gpu tests --ignore=tests/faults -p no:cacheprovider
step ddp_nccl 40 python3 -m torch.distributed.run --nproc-per-node 1 --standalone -m cli.main distill \
  --teacher-ckpt $TA --epochs 2 --out runs/gpu-ddp
step bench_run 40 python3 -m cli.main bench runs/s-spofa-default/student.safetensors --backend torch-eager,torch-cudagraph \
  --batch 1,64 --min-s 1 --warmup-s 0.3 --json "$OUT/bench_run.json"
step bench_compile 90 python3 benchmarks/bench_models.py --backends torch-compile --json "$OUT/bench_compile.json"
echo "=== done $(date +%T)" | tee -a "$L"
