#!/usr/bin/env bash
# Every speed ratio of the fast-path work (issue 15) on one CUDA GPU, meant to finish in under 5 minutes.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]        # from the repository root, with graftnet installed
#
# Writes OUT_DIR/gpu-<time>/ (default: $OUT, else benchmarks/results): the device and versions, and one text
# file per benchmark. Each benchmark has its own time limit, so one that hangs cannot eat the others' time.
set -euo pipefail

root="${1:-${OUT:-benchmarks/results}}"
out="$root/gpu-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
python - <<'EOF' | tee "$out/device.txt"
import platform, sys
import torch, timm, graftnet
if not torch.cuda.is_available():
    sys.exit("run_gpu.sh: torch sees no CUDA device")
print(f"device: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
print(f"graftnet {graftnet.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, "
      f"Python {platform.python_version()}")
EOF

run() {  # run NAME LIMIT_SECONDS COMMAND...: one benchmark, its output kept whatever happens
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee "$out/$name.txt"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v '^W[0-9]\{4\} ' | tee -a "$out/$name.txt" || echo "(exit $?)" | tee -a "$out/$name.txt"
  echo "($((SECONDS - start)) s)" | tee -a "$out/$name.txt"
}

run speed_fp32 50 python benchmarks/bench_speed.py --device cuda --rounds 20 --threads 4
run speed_bf16 45 python benchmarks/bench_speed.py --device cuda --rounds 20 --threads 4 --precision bf16
run speed_fp16 45 python benchmarks/bench_speed.py --device cuda --rounds 20 --threads 4 --precision fp16
run speed_compiled 110 python benchmarks/bench_speed.py --device cuda --rounds 10 --threads 4 --compile
run rl 40 python benchmarks/bench_rl.py --device cuda --rounds 5 --updates 30
echo "results in $out"
