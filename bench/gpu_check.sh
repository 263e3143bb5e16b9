#!/usr/bin/env bash
# The device check for a session that is lent a GPU machine: one call, under ten minutes, every result under $OUT
# (at most 8 files come back). From the repository root:
#     bash bench/gpu_check.sh                     # on the GPU machine (the device tool: run, timeout_s=590)
#     GPU_CHECK_QUICK=1 bash bench/gpu_check.sh   # here, on the CPU: the same steps on --quick shapes
# Steps, each under its own time limit so that a slow one cannot eat the others:
#   1. env.txt: the card, driver and package versions, the commit;
#   2. tests.log: correctness on the GPU first (tests/core/test_device.py, and every kernel against its plain-torch
#      twin on CUDA); a failure here means the bench numbers below are not to be trusted;
#   3. train.jsonl / decode.jsonl / longest.jsonl (+ .log): `python -m bench --gpu`, split by work (decode.jsonl
#      also holds the per-kernel rows, Triton against its torch twin: what AUTO_TRITON_OPS is to follow).
# Copy the tables into bench/RESULTS.md with the card, date and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ -n "${GPU_CHECK_QUICK:-}" ]; then plan=(--cpu --quick); cap=4096; else plan=(--gpu); cap=131072; fi

step() {  # step NAME SECONDS COMMAND...: output to $OUT/NAME.log and the screen, exit status noted
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $status"
}

{
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PY" -c 'import torch, triton, transformers, peft
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
    git log -1 --format='commit %h %s' 2>/dev/null || echo "commit: not a git checkout"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -k "not cpu": test_device.py's CPU cases run in CI already; here they would spend the step's time in the interpreter.
step tests 140 "$PY" -m pytest -q -x -p no:cacheprovider -k "not cpu" tests/core/test_device.py tests/core/kernels
step train 180 "$PY" -m bench "${plan[@]}" --only train,loss --json "$OUT/train.jsonl"
step decode 130 "$PY" -m bench "${plan[@]}" --only kernels,decode --json "$OUT/decode.jsonl"
step longest 90 "$PY" -m bench "${plan[@]}" --only longest --longest-cap "$cap" --json "$OUT/longest.jsonl"
ls -la "$OUT"
