#!/usr/bin/env bash
# Every GPU measurement that docs/ and results/ quote for the recipes, the zoo and check-model's speed, in
# one command on one machine (so the numbers compare), each step alone (so its timing is its own).
#
#   bash tools/gpu_measure.sh OUT_DIR [PART]...      PART: tiers zoo fixes speed long parallel (default), before
#   bash tools/gpu_measure.sh --dry-run [PART]...    print the commands, run nothing
#
# tiers  the full tier (timed), gated against the committed baseline of this GPU, and a new baseline made
#        from it (OUT_DIR/baseline.json: compare before replacing results/baselines/); the recipes tier,
#        its report (which scenario separates which recipe), the per-recipe trade-off (bench/tradeoff.py
#        --measure), eager and compiled; the CUDA tests
# zoo    python -m harness zoo at the GPU's sizes (docs/zoo.md)
# fixes  check-model --fix on the three zoo regimes the fix search is for (docs/check_model.md)
# speed  check-model's training step against the bare loop (bench/check_model.py) on GPT-2 124M, LLaMA
#        ~134M and ViT-B/16, with the kernel profile of GPT-2's
# long   check-model of GPT-2 124M, the five default strategies, 1000 updates: reference cache cold, then warm
# parallel  what sharing the GPU changes: the full tier with one worker process (the default is four; the
#        records must be tiers' apart from timings, bench/same_records.py), and check-model of GPT-2 124M
#        (32 updates, no cache) with its trainings one at a time and four at once (--parallel 1 | 4): the same
#        records, and the wall time of each
# before the full tier of an older checkout (BEFORE=DIR, e.g. made with `git worktree add DIR REV`), then of
#        this one, back to back, and the gate of this one against the older: "not slower", on one machine
#
# Seen on one H100 (results/h100/round5): full tier 160 s; the recipes tier alone reached 3071 of its 3324
# records in 150 s; CUDA tests 222 s and the zoo over 400 s (both beside other work); each fix 85-108 s;
# GPT-2's step ratios 152 s and ViT's 126 s with one repeat and the kernels' loops (now: three repeats,
# without them); the trade-off 47 s. So a 600 s call holds about two parts.
#
# Needs the recipes and zoo extras (pip install -e '.[recipes,zoo]'). Each step writes OUT_DIR/<step>.log;
# OUT_DIR/steps.tsv gets a line per step: name, exit code, wall seconds. A failing step does not stop the
# rest (a failing check-model exits 1 by design). Exit 0, or 2 with one line on bad input.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
usage="usage: bash tools/gpu_measure.sh (OUT_DIR | --dry-run) [tiers|zoo|fixes|speed|long|parallel|before]..."
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
dry=0; out="$1"; shift
if [ "$out" = "--dry-run" ]; then dry=1; out="OUT_DIR"; fi
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(tiers zoo fixes speed long parallel)
for p in "${parts[@]}"; do
  case "$p" in tiers|zoo|fixes|speed|long|parallel) ;;
    before) [ $dry = 1 ] || [ -f "${BEFORE:-}/harness/__main__.py" ] \
              || { echo "part before needs BEFORE=DIR, a checkout of the older commit (git worktree add DIR REV)" >&2; exit 2; };;
    *) echo "unknown part '$p'; parts: tiers zoo fixes speed long parallel before (default: all but before)" >&2
       exit 2;; esac
done
if [ $dry = 0 ]; then
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || { echo "no CUDA device here: these are GPU measurements (--dry-run prints them)" >&2; exit 2; }
  [ ! -e "$out" ] || { echo "$out exists; give a new directory (nothing is overwritten)" >&2; exit 2; }
  mkdir -p "$out" || { echo "cannot create $out" >&2; exit 2; }
  out="$(cd "$out" && pwd)"  # absolute: the part before runs in another directory
  printf 'step\trc\twall_s\n' > "$out/steps.tsv"
  python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" > "$out/device.txt" 2>&1
fi

step() {  # step NAME COMMAND...: run it alone, log it, record its exit code and wall time
  local name="$1"; shift
  if [ $dry = 1 ]; then echo "$*"; return; fi
  local t0 rc; t0=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1; rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
    "$t0" "$(date +%s.%N)")" >> "$out/steps.tsv"
}

in_dir() {  # in_dir DIR COMMAND...: the command run from DIR (python -m harness then runs DIR's harness)
  local d="$1"; shift
  (cd "$d" && "$@")
}

# the committed baseline of this GPU (results/baselines/cuda-<name>.json), or none yet
base="results/baselines/cuda-GPU_NAME.json"
if [ $dry = 0 ]; then
  base="results/baselines/cuda-$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))").json"
  [ -f "$base" ] || base=""
fi

for p in "${parts[@]}"; do
  case "$p" in
  tiers)
    step full_tier python -m harness run --quiet --device cuda --tier full --out "$out/full"
    [ -z "$base" ] || step gate_full python -m harness gate "$out/full" --baseline "$base"
    step baseline python -m harness gate "$out/full" --baseline "$out/baseline.json" --update
    step recipes_tier python -m harness run --quiet --device cuda --tier recipes --out "$out/recipes"
    step recipes_report python -m harness report "$out/recipes"
    step tradeoff python bench/tradeoff.py --run "$out/recipes" --measure --markdown "$out/tradeoff.md" \
      --out "$out/tradeoff.json"
    # the same steps compiled: torchao's float8 speed-ups are documented under torch.compile (eager, on an
    # H100, every FP8 step was slower than BF16's)
    step tradeoff_compiled python bench/tradeoff.py --run "$out/recipes" --measure --strategy bf16 \
      --strategy "bf16,compile=yes" --strategy "torchao-fp8-tensorwise,compile=yes" \
      --strategy "torchao-fp8-rowwise,compile=yes" --strategy "torchao-fp8-rowwise-gw-hp,compile=yes" \
      --markdown "$out/tradeoff_compiled.md" --out "$out/tradeoff_compiled.json"
    step cuda_tests python -m pytest -m cuda -o addopts= -q -rs -p no:cacheprovider tests
    ;;
  zoo)
    step zoo python -m harness zoo --device cuda --out "$out/zoo"
    ;;
  fixes)
    step fix_qk1000 python -m harness check-model zoo:gpt2-qk1000 --strategy fp16-dynamic --strategy bf16 \
      --device cuda --fix --out "$out/fix_qk1000"
    step fix_smallinit python -m harness check-model zoo:llama-smallinit --strategy fp16-dynamic --strategy bf16 \
      --device cuda --fix --out "$out/fix_smallinit"
    step fix_outliers python -m harness check-model zoo:llama-outliers --strategy fp8-tensorwise \
      --strategy torchao-fp8-tensorwise --strategy bf16 --device cuda --fix --out "$out/fix_outliers"
    ;;
  speed)
    for m in gpt2 llama vit; do
      prof=(); [ $m = gpt2 ] && prof=(--profile)
      step "ratios_$m" python bench/check_model.py --model $m --size full --steps 60 --device cuda --no-check \
        "${prof[@]}" --strategy fp16-gradscaler --strategy bf16 --strategy fp8-tensorwise \
        --strategy torchao-fp8-rowwise --json "$out/ratios_$m.json"
    done
    ;;
  before)
    old="${BEFORE:-BEFORE_DIR}"
    step before_full in_dir "$old" python -m harness run --quiet --device cuda --tier full --out "$out/before_full"
    step after_full python -m harness run --quiet --device cuda --tier full --out "$out/after_full"
    step before_baseline python -m harness gate "$out/before_full" --baseline "$out/before_baseline.json" --update
    step gate_after_vs_before python -m harness gate "$out/after_full" --baseline "$out/before_baseline.json"
    ;;
  parallel)
    [ -d "$out/full" ] || step full_tier python -m harness run --quiet --device cuda --tier full --out "$out/full"
    step full_tier_1worker python -m harness run --quiet --device cuda --tier full --workers 1 --out "$out/full_1worker"
    step same_full python bench/same_records.py "$out/full" "$out/full_1worker"
    step gpt2_parallel1 python -m harness check-model zoo:gpt2@base --device cuda --no-cache --parallel 1 \
      --out "$out/gpt2_parallel1"
    step gpt2_parallel4 python -m harness check-model zoo:gpt2@base --device cuda --no-cache --parallel 4 \
      --out "$out/gpt2_parallel4"
    step same_gpt2 python bench/same_records.py "$out/gpt2_parallel1" "$out/gpt2_parallel4"
    ;;
  long)
    step long_cold python -m harness check-model zoo:gpt2@base --steps 1000 --device cuda --cache "$out/refcache" \
      --out "$out/long_cold"
    step long_warm python -m harness check-model zoo:gpt2@base --steps 1000 --device cuda --cache "$out/refcache" \
      --out "$out/long_warm"
    ;;
  esac
done
exit 0
