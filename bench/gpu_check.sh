#!/usr/bin/env bash
# The device check for a session that is lent a GPU machine: every result under $OUT (at most 8 files come back;
# this writes at most 6). From the repository root:
#     bash bench/gpu_check.sh stamp                # here, before the device calls: writes bench/COMMIT (below)
#     GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh    # on the GPU first: the bench's GPU paths on tiny shapes, 2 min
#                                                  #   at most (device tool: run, timeout_s=150)
#     bash bench/gpu_check.sh                      # on the GPU: the check, 8 min at most (run, timeout_s=500)
#     GPU_CHECK_QUICK=1 bash bench/gpu_check.sh    # here, on the CPU: the same steps on --quick shapes
# The commit: the device machine receives the working tree without .git (once it kept a stale one), so the commit
# is taken from $BENCH_COMMIT, else bench/COMMIT, else git. `stamp` writes that file here (the short commit, "-dirty" when
# tracked files have changes, which travel too); being untracked and not ignored, it travels with the tree.
# Delete it after the calls (git status shows it) so that it is never committed.
#
# Steps, each under its own time limit so that a slow one cannot eat the others; each bench step writes its rows
# (and the longest-sequence search each probe) to its JSON file as they finish, so a step cut short keeps them:
#   step      limit  what
#   env       ~10 s  env.txt: the card, driver and package versions, the commit (nvidia-smi and Python under
#                    10 s and 20 s limits)
#   tests     110 s  correctness on the GPU first (tests/core/test_device.py, every kernel against its plain-torch
#                    twin); a failure here means the numbers below are not to be trusted. Four workers where
#                    pytest-xdist is there (compiling kernels is CPU work), 60 s a test where pytest-timeout is
#   kernels    40 s  each Triton kernel against its torch twin at the Llama-8B training shape (do_bench): what
#                    AUTO_TRITON_OPS is to follow; ~12 s of start-up (imports, CUDA, a priming step) + ~20 s
#   train     110 s  LoRA train (Llama-1B with GC first), the 50-step loss curve, Llama-8B, QLoRA last (the row a
#                    slow start may cut); each side builds its model, ~5-25 s a row
#   decode    120 s  Llama-1B greedy decode at batch 1 and 32: each row compiles our step cold (CUDA graphs,
#                    ~30-40 s) and HF's generate runs 256 tokens eagerly (PERFORMANCE.md saw 55 ms a token at
#                    batch 1); the SmolLM2 row of the full plan is left out for that
#   longest    75 s  one search, Llama-1B from 32,768 in steps of 16,384, each side stopped at a 30 s deadline
#                    (no probe starts that would end past it): HF's bracket and a lower bound for ours
# 455 s of limits and the env step: about 7.8 minutes. Smoke mode: env, then one `--gpu --quick` run of every
# work, 100 s at most (~70 s expected, kernels and two decode steps compiled cold).
# GPU_CHECK_STEPS picks the steps and their order, from smoke (the smoke mode's run) and the five above; a lease
# too short for a smoke call and a full call (each start costs a minute or two) splits them, e.g.
#     GPU_CHECK_STEPS="smoke tests kernels" bash bench/gpu_check.sh     # first call: run, timeout_s=290
#     GPU_CHECK_STEPS="train decode longest" bash bench/gpu_check.sh    # after the fixes: run, timeout_s=330
# GPU_CHECK_TESTS (pytest arguments) narrows the tests step to a rerun of what failed. One more step is there
# to be named, not in the default list: serving (150 s; Llama-1B: the engine's compiled step against its eager one
# at 1 and 32 streams, 32 streams against one, then 16 streams on 16 adapters in one batch against the base and
# against one engine per adapter, the row that may be cut: its 16 eager engines took over 80 s on the H200;
# bench/serving.py), and ab (150 s;
# bench/profile.py's decode_ab: the decode step's designs side by side, Llama-1B batch 1, decode_ab.txt).
# Files: env.txt, steps.log (every step's output), and kernels/train/decode/longest.jsonl, or smoke.jsonl.
# Copy the tables into bench/RESULTS.md with the card, date and commit.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = stamp ]; then
    c=$(git rev-parse --short HEAD) || exit 1
    git diff --quiet HEAD -- || c="$c-dirty"
    echo "$c" > bench/COMMIT
    echo "bench/COMMIT: $c (delete it after the device calls)"
    exit 0
fi

OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then mode=smoke; plan=(--gpu --quick)
elif [ -n "${GPU_CHECK_QUICK:-}" ]; then mode=quick; plan=(--cpu --quick)
else mode=full; plan=(--gpu --check); fi
summary=()

step() {  # step NAME SECONDS COMMAND...: output appended to $OUT/steps.log (as it comes), its tail shown
    local name=$1 limit=$2 start=$SECONDS from status
    shift 2
    echo "== $name (at most ${limit} s): $*" | tee -a "$OUT/steps.log"
    from=$(($(stat -c %s "$OUT/steps.log") + 1))
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/steps.log" 2>&1
    status=$?
    tail -c "+$from" "$OUT/steps.log" | tail -n 20
    local what="exit $status"
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then what="killed at its time limit"; fi
    echo "== $name: $what after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/steps.log"
    summary+=("$name: $what, $((SECONDS - start)) s of $limit")
}

commit() {  # the order bench/run.py's commit_id() follows (the stamp before git: see commit_id)
    if [ -n "${BENCH_COMMIT:-}" ]; then echo "commit $BENCH_COMMIT (from BENCH_COMMIT)"
    elif [ -s bench/COMMIT ]; then echo "commit $(cat bench/COMMIT) (from bench/COMMIT)"
    elif [ "$(git rev-parse --show-toplevel 2>/dev/null)" = "$(pwd -P)" ]; then git log -1 --format='commit %h %s'
    else echo "commit: unknown (no git checkout, no BENCH_COMMIT, no bench/COMMIT: see gpu_check.sh's header)"; fi
}

start=$SECONDS
{
    echo "mode $mode, $(date -u +%FT%TZ)"
    timeout 10 nvidia-smi 2>&1 || echo "no nvidia-smi"
    timeout 20 "$PY" -c 'import torch, triton, transformers, peft
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
    commit
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
summary+=("env: $((SECONDS - start)) s")

bench() {  # bench NAME SECONDS WORKS: one `python -m bench` run of those works, rows to $OUT/NAME.jsonl
    step "$1" "$2" "$PY" -m bench "${plan[@]}" --only "$3" --json "$OUT/$1.jsonl"
}

# -k "not cpu": test_device.py's CPU cases run in CI already; here they would spend the step's time in the
# interpreter. --maxfail, not -x: one failure must not hide the kernels' results.
tests=(-q -p no:cacheprovider --maxfail=20 -k "not cpu")
if "$PY" -c 'import pytest_timeout' 2> /dev/null; then tests+=(--timeout=60); fi
if [ "$mode" = full ] && "$PY" -c 'import xdist' 2> /dev/null; then tests+=(-n 4); fi
read -ra targets <<< "${GPU_CHECK_TESTS:-tests/core/test_device.py tests/core/kernels}"
if [ "$mode" = smoke ]; then default=smoke; else default="tests kernels train decode longest"; fi
for s in ${GPU_CHECK_STEPS:-$default}; do
    case $s in
        smoke) step smoke 100 "$PY" -m bench --gpu --quick --only ceilings,kernels,train,loss,decode,longest \
                   --json "$OUT/smoke.jsonl" ;;
        tests) step tests 110 "$PY" -m pytest "${tests[@]}" "${targets[@]}" ;;
        kernels) bench kernels 40 kernels ;;
        train) bench train 110 train,loss ;;
        decode) bench decode 120 decode ;;
        longest) bench longest 75 longest ;;
        serving) bench serving 150 served-step,streams,adapters ;;
        ab) step ab 150 "$PY" -m bench.profile --only decode_ab --out "$OUT" ;;
        *) echo "unknown step $s (smoke tests kernels train decode longest serving ab)"; exit 2 ;;
    esac
done
echo "== summary ($mode, $((SECONDS - start)) s in all; files in $OUT)"
printf '%s\n' "${summary[@]}"
ls "$OUT"
