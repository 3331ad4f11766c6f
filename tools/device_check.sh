#!/usr/bin/env bash
# GPU checks in one prepared run, for a machine with a CUDA GPU and the project's packages importable
# (no venv needed: run it with the python that has torch). Every phase has its own time limit and
# log, so one failure does not cost the others; results land in OUT_DIR:
#   setup.log             GPU, driver, package versions, DALI / nvJPEG smoke test; corpus + packing
#   pipeline_gpu.json     bench-pipeline with batches delivered on the GPU (bench/pipeline.py)
#   profile_dali.log      bench/profile_dali.py: our DALI graph cut after each stage (JSON last line)
#   test_gpu.log          tests/test_gpu.py (DALI mixed + torchvision GPU decode agree with the CPU
#                         path; the trainer in bf16 / fp16 on the GPU)
#   train_gpu.json        bench-train: g2d_resnet50 at batch 128/256, ours vs the official recipe, data
#                         excluded and included, MFU, peak memory per sample, the largest batch per GPU,
#                         a torch.profiler summary of one step ("profile"), and the lever arms
#                         ("levers": compile, CUDA graphs + length buckets, eager attention) merged in
#   performance.md        docs/performance.md with the GPU sections written
#   bench_pipeline.log, bench_train.log   the benchmarks' output (+ the profiler table, the levers' log)
# (eight files: the most a lent machine's run brings back)
# Usage: [PHASES="pipeline profile tests train levers"] tools/device_check.sh OUT_DIR [STUDIES]
#   STUDIES: synthetic corpus size (default 15000 at 384 px -> 256-px shards: ~13,500 train images,
#   >= 100 batches per epoch at batch 128, so epoch start-up is amortised as in a real run);
#   PHASES: which of the five to run (default all). Phase limits are ceilings summing to ~8 minutes
#   (env ~10 s, data 90 (~40 ms of CPU per 384-px study: ~40 s on 16 cores), pipeline 40, profile 30,
#   tests 90, train 150, levers 70); a phase cut by its limit keeps what it wrote so far.
set -u
OUT_DIR=${1:?usage: tools/device_check.sh OUT_DIR [STUDIES]}
STUDIES=${2:-15000}
PY=${PY:-python3}
PHASES=${PHASES:-pipeline profile tests train levers}
want() { [[ " $PHASES " == *" $1 "* ]]; }
CORES=$(nproc)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
phase() { echo "== $(date +%T) $*"; }
collect() { cp bench/results/pipeline_gpu.json bench/results/train_gpu.json docs/performance.md "$OUT_DIR"/ 2>/dev/null; }

phase env
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY - <<'EOF'
import io, platform
import numpy as np, torch, torchvision
from PIL import Image
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))
buf = io.BytesIO()
Image.fromarray((np.arange(256 * 200) % 251).astype(np.uint8).reshape(200, 256)).save(buf, "JPEG", quality=90)
data = torch.frombuffer(buf.getvalue(), dtype=torch.uint8)
from torchvision.io import ImageReadMode, decode_jpeg
print("torchvision decode_jpeg(cuda, GRAY):", tuple(decode_jpeg([data], mode=ImageReadMode.GRAY, device="cuda")[0].shape))
try:
    import nvidia.dali as dali
    from nvidia.dali import fn, pipeline_def, types
    @pipeline_def(batch_size=1, num_threads=1, device_id=0)
    def p():
        return fn.decoders.image(fn.external_source(source=lambda: [np.frombuffer(buf.getvalue(), np.uint8)]),
                                 device="mixed", output_type=types.GRAY)
    pipe = p(); pipe.build()
    print("dali", dali.__version__, "mixed decode:", pipe.run()[0].as_cpu().as_array().shape)
except Exception as exc:  # reported, the run goes on: DALI phases will say they were skipped
    print("dali unavailable:", repr(exc))
EOF
} > "$OUT_DIR/setup.log" 2>&1
cat "$OUT_DIR/setup.log"

# 384-px sources: the shards store 256 px either way, and generating 15,000 studies at 2048 px would
# take most of the budget.
phase "data: $STUDIES synthetic studies at 384 px -> 256-px shards"
timeout 90 $PY -m tools.pack_shards --synthetic data/synthetic_gpu --synth-n "$STUDIES" --synth-size 384 \
  --out data/shards/mimic --workers "$CORES" --seed 0 >> "$OUT_DIR/setup.log" 2>&1
echo "data rc=$?"; tail -3 "$OUT_DIR/setup.log"

# run_phase NAME LOG SECONDS CMD...: the phase's output to OUT_DIR/LOG, its tail and exit status here.
run_phase() {
  local name=$1 log=$2 limit=$3; shift 3
  want "$name" || return 0
  phase "$name"
  timeout "$limit" "$@" > "$OUT_DIR/$log" 2>&1
  echo "$name rc=$?"; tail -25 "$OUT_DIR/$log"; collect
}
run_phase pipeline bench_pipeline.log 40 $PY -m bench.pipeline --device cuda --shards data/shards/mimic \
  --batch-size 64 --epochs 1 --runs 2 --workers "$CORES"
run_phase profile profile_dali.log 30 $PY -m bench.profile_dali --device cuda --shards data/shards/mimic
run_phase tests test_gpu.log 90 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
# ours vs official at 128, data excluded + included; the largest batch per GPU; one profiled step.
run_phase train bench_train.log 150 $PY -m bench.train --models g2d_resnet50 --batch-sizes 128 \
  --shards data/shards/mimic --steps 5 --max-batch --profile
if want train; then cat bench/results/train_profile_gpu.txt >> "$OUT_DIR/bench_train.log" 2>/dev/null; fi
# The levers at batch 256, data excluded, cheap arms first (compile time counts against this phase
# only; results are saved after every arm): merged into train_gpu.json as "levers".
if want levers; then
  phase levers
  timeout 70 $PY -m bench.train --models g2d_resnet50 --batch-sizes 256 --shards none --steps 5 \
    --arms ours,eager_attn,bucket16,compile,graphs --no-doc --results-dir bench/results/levers >> "$OUT_DIR/bench_train.log" 2>&1
  echo "levers rc=$?"; tail -12 "$OUT_DIR/bench_train.log"
  $PY - <<'EOF'
import json, pathlib
main, levers = pathlib.Path("bench/results/train_gpu.json"), pathlib.Path("bench/results/levers/train_gpu.json")
if main.is_file() and levers.is_file():
    data = json.loads(main.read_text()); data["levers"] = json.loads(levers.read_text())["runs"]
    main.write_text(json.dumps(data, indent=1))
EOF
  collect
fi
phase done
