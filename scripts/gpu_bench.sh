#!/usr/bin/env bash
# The GPU measurements of issues 8 and 9 in one device call, results into $OUT (<= 8 files).
#   here:                          bash scripts/gpu_prepare.sh   (bundles .gpu/; carry it to the device)
#   device machine, project root:  source .gpu/env.sh && bash scripts/gpu_bench.sh
#   rehearsal on a CPU machine:      OUT=/tmp/gpu-out SIZE=tiny bash scripts/gpu_bench.sh
# PART=1: ceiling (service vs in-process vs naive), eager train-speed, recipe-compare, memory.
# PART=2: a profiled eager step, compiled training, 4 front-ends on both scenarios.
# PART=3 (default; <= BUDGET_S): the service with CUDA graphs (auto front-ends), GPU memory vs adapters,
#   compiled training (inductor, + CUDA graphs), recipe-compare compiled.
# Bundle first: bash scripts/gpu_prepare.sh; run it with the device tool's timeout_s 600 (BUDGET_S=545 inside: the
# 600 s also pay for `source .gpu/env.sh` installing the wheels, which runs before T0, and a step's kill grace).
# recipe-compare trains on the whole 20k sample, as the study mapped it (chunk padding depends on it).
# Each step has its own time limit so one slow step cannot take the others' results with it.
set -u
OUT=${OUT:-/tmp/gpu-out}
SIZE=${SIZE:-full}
PART=${PART:-3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
# The device tool stops a command at 600 s: every step's limit is cut to what is left of BUDGET_S, so the
# script ends (and $OUT comes back) before that, and a step with under 20 s left is skipped, not started.
BUDGET_S=${BUDGET_S:-545}
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left} s left of BUDGET_S=$BUDGET_S"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: start at +$(($(date +%s) - T0)) s (limit $limit s)"
  timeout -k 5 "$limit" "$@"
  echo "=== $name: rc=$? at +$(($(date +%s) - T0)) s"
}
if [ "$SIZE" = full ]; then
  DEV=(--device cuda); SHAPE=roberta-large; TRAIN_CFG=configs/speed-roberta-large-random.yaml
  TRAIN_OVR=(); RC_SET=train_subset=null; BATCHES=16,64,256; DUR=5; BATCHES3=${BATCHES3:-16,256}
else  # a 2-layer RoBERTa on the CPU: checks that every command runs, measures nothing of interest
  DEV=(); SHAPE=tiny; TRAIN_CFG=configs/speed-roberta-large-random.yaml
  TRAIN_OVR=(--overrides arch_preset=tiny-roberta); RC_SET=train_subset=null,arch_preset=tiny-roberta
  BATCHES=8,16; DUR=2; BATCHES3=${BATCHES3:-8,16}
fi
RC_OVR=(--overrides $RC_SET)
STORE=/tmp/ceiling-stores/$SHAPE-32
py=python3; command -v python3 >/dev/null || py=python

# Preflight (seconds): every import the steps make and the load client, so a bundle that lacks one stops
# here with its name instead of failing each step after minutes of device time (bundle: scripts/gpu_prepare.sh).
if ! $py - <<'PY'
import importlib, shutil, sys
mods = ("msgpack orjson psutil uvloop httptools datasets fastapi uvicorn starlette pydantic transformers tokenizers "
        "peft accelerate safetensors prometheus_client httpx yaml pandas pyarrow sklearn torch "
        "service.app service.engine service.client benchmarks.ceiling benchmarks.memory benchmarks.recipe_compare "
        "benchmarks.train_speed benchmarks.baseline_server training.loop").split()
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001 - name every failure at once
        missing.append(f"{m} ({type(e).__name__}: {e})")
if not shutil.which("wrk"):
    missing.append("wrk (not on PATH: install it where scripts/gpu_prepare.sh runs, so .gpu/bin carries it)")
print("preflight:", "ok" if not missing else "MISSING " + "; ".join(missing), flush=True)
sys.exit(1 if missing else 0)
PY
then
  echo "=== preflight failed: nothing measured (re-run scripts/gpu_prepare.sh with what is missing)"; exit 3
fi

{ nvidia-smi || true; $py -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.is_available())"; nproc; which wrk; } > "$OUT/env.txt" 2>&1
if [ "$PART" = 1 ]; then
  cat "$OUT/env.txt"
  # 2026-11-28 (H200): ceiling 175 s, train-speed 6 runs > 110 s, recipe-compare with compile auto spent
  # its 90 s compiling (hence compile=false here: eager vs the Trainer; compiled runs are PART 2).
  step ceiling 230 $py -m benchmarks ceiling --shape $SHAPE "${DEV[@]}" --adapters 32 --no-onnx-int8 \
    --scenarios full,adapters-32 --concurrency 1,32,64 --duration $DUR --warmup 1 --rounds 2 --out "$OUT/ceiling-gpu.json"
  step train-speed 150 $py -m benchmarks train-speed --config $TRAIN_CFG --methods full,lora --batch-sizes $BATCHES \
    --steps 30 --log-every 10 "${TRAIN_OVR[@]}" --out "$OUT/train-speed-gpu.json"
  step recipe-compare 80 $py -m benchmarks recipe-compare --config $TRAIN_CFG --steps 60 --batch-size 16 \
    --study-precision bf16 --steady-after 10 --test-samples 32 --training-runs 1 "${RC_OVR[@]}" --out "$OUT/recipe-compare-gpu.json"
  step memory 160 $py -m benchmarks memory --store $STORE --variants full,lora-0 --counts 1,8,32,128 \
    "${DEV[@]}" --precision bf16 --out "$OUT/memory-gpu.json"
elif [ "$PART" = 2 ]; then
  # where an eager step's time goes (host and device operators), then what compiling buys and costs
  step train-profile 120 $py -m benchmarks train-speed --config $TRAIN_CFG --methods full --batch-sizes 16 \
    --steps 20 --log-every 10 --profile "${TRAIN_OVR[@]}" --out "$OUT/train-speed-gpu-profile.json"
  step train-compiled 300 $py -m benchmarks train-speed --config $TRAIN_CFG --methods full --batch-sizes 16,64 \
    --compile true --steps 40 --log-every 10 "${TRAIN_OVR[@]}" --out "$OUT/train-speed-gpu-compiled.json"
  step frontends 100 $py -m benchmarks ceiling --shape $SHAPE "${DEV[@]}" --adapters 32 --no-onnx-int8 \
    --scenarios full,adapters-32 --concurrency 64,128 --duration $DUR --warmup 1 --rounds 2 --no-naive \
    --service-args=--frontends,4 --out "$OUT/ceiling-gpu-frontends4.json"
else
  # Order: what no compilation can stall first (the service's figures, then GPU memory vs adapters on the
  # store the ceiling built), then training; one compilation (dynamic=True) serves every batch size and its
  # caches serve the later runs. The budget cuts the last step first.
  step ceiling 190 $py -m benchmarks ceiling --shape $SHAPE "${DEV[@]}" --adapters 32 --no-onnx-int8 \
    --scenarios full,adapters-32 --concurrency 1,32,64 --duration 4 --warmup 1 --rounds 2 --out "$OUT/ceiling-gpu.json"
  step memory 90 $py -m benchmarks memory --store $STORE --variants full,lora-0 --counts 1,8,32,128 \
    "${DEV[@]}" --precision bf16 --out "$OUT/memory-gpu.json"
  step train-b16 140 $py -m benchmarks train-speed --config $TRAIN_CFG --methods full --batch-sizes ${BATCHES3%%,*} \
    --compile true,reduce-overhead --steps 30 --log-every 10 "${TRAIN_OVR[@]}" --out "$OUT/train-speed-gpu-compiled-small.json"
  step recipe-compare 80 $py -m benchmarks recipe-compare --config $TRAIN_CFG --steps 50 --batch-size 16 \
    --study-precision bf16 --steady-after 10 --test-samples 32 --training-runs 1 \
    --overrides $RC_SET,compile=true,compile_mode=reduce-overhead --out "$OUT/recipe-compare-gpu.json"
  step train-big 60 $py -m benchmarks train-speed --config $TRAIN_CFG --methods full --batch-sizes ${BATCHES3##*,} \
    --compile true,reduce-overhead --steps 30 --log-every 10 "${TRAIN_OVR[@]}" --out "$OUT/train-speed-gpu-compiled-big.json"
fi
echo "=== done at +$(($(date +%s) - T0)) s"
