#!/usr/bin/env bash
# The GPU rows of every benchmark and the GPU tests, in one prepared run of at most about 10 minutes.
#
#     benchmarks/gpu_check.sh [OUT_DIR]        # default: benchmarks/gpu-out
#
# On a machine with CUDA it runs, each under its own time limit, writing OUT_DIR/<row>.log and one line per row
# to OUT_DIR/summary.txt (the rows BENCHMARKS.md takes): the GPU tests (pytest -m gpu), the SAE step, extraction,
# the FAISS GPU index, local TTT (exact and fast) and a reduced scale rehearsal. Without CUDA every row is
# recorded as skipped with the reason and the script exits 0; a row that fails is recorded with its exit status,
# and the script then exits 1. GPU_CHECK_PYTHON picks the interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu-out}"
py="${GPU_CHECK_PYTHON:-python}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
failed=0

cuda="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
faiss_gpus="$("$py" -c 'import faiss; print(faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)' 2>/dev/null || echo 0)"
echo "machine: ${cuda:-no CUDA device}; FAISS GPUs: ${faiss_gpus}; $(nproc) CPU cores; $(date -u +%FT%TZ)" >> "$summary"

# row NAME SECONDS NEEDS COMMAND...: run COMMAND under a time limit when NEEDS (cuda | faiss) is available.
row() {
    local name="$1" limit="$2" needs="$3"
    shift 3
    if [ -z "$cuda" ]; then
        echo "$name: skipped: no CUDA device (torch.cuda.is_available() is false)" >> "$summary"
        return
    fi
    if [ "$needs" = "faiss" ] && [ "${faiss_gpus:-0}" = "0" ]; then
        echo "$name: skipped: this FAISS has no GPU support (install faiss-gpu for the GPU index)" >> "$summary"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        echo "$name: ok in ${took} s: $(tail -n 1 "$out/$name.log")" >> "$summary"
    else
        echo "$name: FAILED (exit $rc after ${took} s; see $out/$name.log)" >> "$summary"
        failed=1
    fi
}

row gpu-tests 120 cuda "$py" -m pytest -q -m gpu -p no:cacheprovider
row sae-step 60 cuda "$py" benchmarks/bench_sae_step.py --device cuda --repeats 5 --warmup 2
row extract 60 cuda "$py" benchmarks/bench_extract.py --device cuda --n-images 256 --num-workers 4
row faiss-gpu-index 45 faiss "$py" benchmarks/bench_concepts.py --device cuda --sections dense --skip-hnsw \
    --n-rows 200000 --n-queries 2000
row ttt 75 cuda "$py" benchmarks/bench_ttt.py --device cuda --allow-loaded
row scale 150 cuda "$py" benchmarks/bench_scale.py --device cuda --rows 200000 --sae-steps 300 \
    --work "$out/scale-work"

cat "$summary"
exit "$failed"
