#!/usr/bin/env bash
# Issue 9's (and 20's) GPU checks in one call, most important first, each phase under its own timeout, logs in $OUT.
#   device machine:  source .whl/preamble.sh && bash scripts/gpu_generation_check.sh
#   CPU dry run:     OUT=/tmp/out JAX_PLATFORMS=cpu bash scripts/gpu_generation_check.sh --tiny
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD:$PWD/scripts}
if [ "${1:-}" = "--tiny" ]; then
  SHAPE="--hidden 256 --layers 2 --heads 4 --kv-heads 2 --intermediate 512 --vocab 1024 --batch 4 --prompt-len 64 --new-tokens 64 --dtype bfloat16 --repeats 1"
  KERNEL="--interpret"; T=600
else
  SHAPE="--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 32000 --batch 32 --prompt-len 512 --new-tokens 256 --dtype bfloat16"
  KERNEL="--batch 32 --max-len 768 --q-heads 32 --kv-heads 8 --head-dim 64 --block-kv 64,128 --num-splits 0,1,2 --num-stages 2,3"; T=240
fi
phase() { local name=$1 limit=$2; shift 2; echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"; }

# 1. The kernel on the real backend against the reference, and inside generation.
phase kernel_tests "$T" env JAX_PLATFORMS= python -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
  tests/test_generate.py -k "pallas or kernel or greedy"
# 2. The kernel alone: bandwidth over the valid K/V against the reference.
phase kernel_bench "$T" python scripts/bench_decode_attention.py $KERNEL
# 3. Whole generate at the 1.1B shape: reference, then the kernel, each against transformers (own process).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
phase generate_reference "$T" python scripts/bench_generate.py $SHAPE --attention reference --append "$OUT/rows.md"
phase generate_pallas "$T" python scripts/bench_generate.py $SHAPE --attention pallas --no-torch --append "$OUT/rows.md"
# 4. XLA's bytes accessed per decode step against the ideal, and the compiled memory.
phase memory "$T" python scripts/bench_generate.py $SHAPE --memory
# 5. The refill engine against static generation on long-tailed and on fixed answer lengths (issue 20).
if [ "${1:-}" = "--tiny" ]; then REFILL="--batch 16 --slots 4 --new-tokens 32"; else REFILL="--batch 256 --slots 64"; fi
phase refill_longtail "$T" python scripts/bench_generate.py $SHAPE $REFILL --lengths longtail --attention reference
phase refill_fixed "$T" python scripts/bench_generate.py $SHAPE $REFILL --lengths fixed --attention reference
cat "$OUT/summary.txt"
