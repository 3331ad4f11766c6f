#!/usr/bin/env bash
# GPU checks in one prepared run, for a machine with a CUDA GPU and the project's packages importable
# (no venv needed: run it with the python that has torch). Every phase has its own time limit and
# log, so one failure does not cost the others; results land in OUT_DIR:
#   setup.log             GPU, driver, package versions, DALI / nvJPEG smoke test; corpus + packing
#   pipeline_gpu.json     bench-pipeline with batches delivered on the GPU (tools/bench_pipeline.py)
#   profile_dali.log      tools/profile_dali.py: our DALI graph cut after each stage (JSON last line)
#   test_gpu.log          tests/test_gpu.py (DALI mixed + torchvision GPU decode agree with the CPU
#                         path; the trainer in bf16 / fp16 on the GPU)
#   train_gpu.json        bench-train: g2d_resnet50 at batch 64/128, ours vs the official recipe
#   performance.md        docs/performance.md with the GPU sections written
#   bench_pipeline.log, bench_train.log   the two benchmarks' output
# (eight files: the most a lent machine's run brings back)
# Usage: [PHASES="pipeline profile tests train"] tools/device_check.sh OUT_DIR [STUDIES]
#   STUDIES: synthetic corpus size (default 4000, ~3,600 train images: at batch 64 an epoch has 56
#   batches, enough for 16 workers x 2 prefetch in flight to leave a steady state to measure);
#   PHASES: which of the four to run (default all). The 1,500-study run took 6 min 15 s on an H200.
set -u
OUT_DIR=${1:?usage: tools/device_check.sh OUT_DIR [STUDIES]}
STUDIES=${2:-4000}
PY=${PY:-python3}
PHASES=${PHASES:-pipeline profile tests train}
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

phase "data: $STUDIES synthetic studies at 2048 px -> 256-px shards (make shards defaults) + 512-px shards"
timeout 240 $PY -m tools.pack_shards --synthetic data/synthetic_gpu --synth-n "$STUDIES" --synth-size 2048 \
  --out data/shards/mimic --workers "$CORES" --seed 0 >> "$OUT_DIR/setup.log" 2>&1 &&
timeout 60 $PY -m tools.pack_shards --synthetic data/synthetic_gpu --synth-n "$STUDIES" --synth-size 2048 \
  --out data/bench/pipeline/shards512 --max-side 512 --quality 95 --workers "$CORES" --seed 0 >> "$OUT_DIR/setup.log" 2>&1
echo "data rc=$?"; tail -3 "$OUT_DIR/setup.log"

# run_phase NAME LOG SECONDS CMD...: the phase's output to OUT_DIR/LOG, its tail and exit status here.
run_phase() {
  local name=$1 log=$2 limit=$3; shift 3
  want "$name" || return 0
  phase "$name"
  timeout "$limit" "$@" > "$OUT_DIR/$log" 2>&1
  echo "$name rc=$?"; tail -25 "$OUT_DIR/$log"; collect
}
run_phase pipeline bench_pipeline.log 300 $PY -m tools.bench_pipeline --device cuda --shards data/shards/mimic \
  --batch-size 64 --epochs 2 --runs 3 --also-shards data/bench/pipeline/shards512 --workers "$CORES"
run_phase profile profile_dali.log 150 $PY -m tools.profile_dali --device cuda --shards data/shards/mimic
run_phase tests test_gpu.log 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
run_phase train bench_train.log 240 $PY -m tools.bench_train --shards data/shards/mimic --steps 5
phase done
