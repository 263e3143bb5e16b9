"""`python -m bench`: pick a plan, run its rows one by one, print one table, optionally write JSON lines."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.grpo import grpo_row
from bench.kernels import kernel_rows
from bench.report import Row, print_table
from bench.serving import adapter_load_row, adapters_rows, long_prompt_row, served_step_row, streams_row
from bench.workloads import Job, Progress, ceilings, decode, longest, loss_agreement, short, train

WORKS = ("train", "loss", "longest", "decode", "ceilings", "kernels", "adapters", "streams", "served-step",
         "adapter-load", "long-prompt", "grpo")
ROOT = Path(__file__).resolve().parent.parent
COMMIT_FILE = ROOT / "bench" / "COMMIT"  # written by `bash bench/gpu_check.sh stamp`: the device gets no .git

# The shapes and micro batches of ../shared/PERFORMANCE.md (hf_baseline.py's plans), plus the rows HF has no
# figure for there (loss agreement, longest sequence for ours).
CPU_PLAN = [
    Job("train", "smollm2-135m", bsz=4, seq=256, gc=False, warmup=1, steps=5),
    Job("train", "smollm2-135m", bsz=4, seq=256, gc=True, warmup=1, steps=5),
    Job("train", "smollm2-135m", bsz=4, seq=256, gc=True, warmup=1, steps=5, nf4=True),
    Job("loss", "smollm2-135m", bsz=2, seq=128, steps=8),
    Job("decode", "smollm2-135m", bsz=1, seq=32, new=64),
    Job("decode", "smollm2-135m", bsz=8, seq=32, new=64),
    # The same step compiled by inductor on the CPU (about a minute of compiling per batch size, not timed).
    Job("decode", "smollm2-135m", bsz=1, seq=32, new=64, compiled=True),
    Job("decode", "smollm2-135m", bsz=8, seq=32, new=64, compiled=True),
    # Serving (bench/serving.py): 16 streams on 16 adapters in one batch, and 32 streams against one.
    Job("adapters", "smollm2-135m", bsz=16, seq=32, new=64),
    Job("streams", "smollm2-135m", bsz=32, seq=32, new=64),
    Job("served-step", "smollm2-135m", bsz=1, seq=32, new=64),
    Job("served-step", "smollm2-135m", bsz=8, seq=32, new=64),
    Job("adapter-load", "smollm2-135m", bsz=8, seq=32, new=128),
    Job("long-prompt", "smollm2-135m", bsz=8, seq=32, new=128, long=2048),
    # GRPO against TRL's GRPOTrainer (bench/grpo.py), each side in its own process: 16 completions a step of 64
    # tokens (about 4 minutes for the pair at one thread), then 8 of 256 (HF's cache grows by concatenation).
    Job("grpo", "smollm2-135m", bsz=2, generations=8, seq=32, new=64, warmup=1, steps=4),
    Job("grpo", "smollm2-135m", bsz=1, generations=8, seq=32, new=256, warmup=1, steps=3),
]
# Within each work the rows PERFORMANCE.md sets a target on come first (Llama-1B training with GC, the loss curve,
# Llama-1B decode), so a run cut short by a time limit keeps them; rows are written out as each one finishes.
GPU_PLAN = [
    Job("ceilings"),
    Job("kernels", "llama-8b", bsz=2, seq=2048),  # each Triton kernel against its torch twin (bench/kernels.py)
    Job("train", "llama-1b", bsz=4, seq=2048, gc=True, warmup=2, steps=10),
    Job("loss", "smollm2-135m", bsz=4, seq=512, gc=True, steps=50),
    Job("train", "llama-1b", bsz=4, seq=2048, gc=False, warmup=2, steps=10),
    Job("train", "llama-8b", bsz=2, seq=2048, gc=True, warmup=2, steps=5),
    Job("train", "smollm2-135m", bsz=8, seq=2048, gc=True, warmup=2, steps=10),
    # QLoRA last among the training rows: under gpu_check.sh's time limit it is the one that may be cut.
    Job("train", "llama-8b", bsz=2, seq=2048, gc=True, warmup=1, steps=3, nf4=True),
    # Each decode row compiles our step cold (CUDA graphs; free_memory resets dynamo between rows).
    Job("decode", "llama-1b", bsz=1, seq=128, new=256),
    Job("decode", "llama-1b", bsz=32, seq=128, new=256),
    Job("decode", "smollm2-135m", bsz=1, seq=128, new=256),
    Job("adapters", "llama-1b", bsz=16, seq=128, new=64),
    Job("streams", "llama-1b", bsz=32, seq=128, new=64),
    Job("served-step", "llama-1b", bsz=1, seq=128, new=64),
    Job("served-step", "llama-1b", bsz=32, seq=128, new=64),
    Job("adapter-load", "llama-1b", bsz=8, seq=128, new=256),
    Job("long-prompt", "llama-1b", bsz=8, seq=128, new=256, long=16384),
    # A probe's attention work grows with the square of its length: the caps keep a probe under about a minute and a
    # half (an 8B step at 131,072 tokens takes about 70 s).
    Job("longest", "llama-8b", seq=8192, cap=131072),
    Job("longest", "llama-1b", seq=8192, cap=262144),
]
# bench/gpu_check.sh's plan, cut to fit its time limits (its header gives them): the GPU plan without the SmolLM2
# decode row (a cold compile of its own, and no target is set on it), and one longest-sequence search, Llama-1B
# from 32k in steps of 16k, each side stopped at a deadline: what a minute can tell (HF's bracket, a lower bound
# for ours), not the limit.
CHECK_PLAN = [
    *(j for j in GPU_PLAN if j.work not in ("decode", "longest")),
    *(j for j in GPU_PLAN if j.work == "decode" and j.shape == "llama-1b"),
    Job("longest", "llama-1b", seq=32768, cap=262144, granularity=16384, deadline=30),
]
QUICK_PLAN = [
    Job("train", "tiny", bsz=2, seq=64, gc=False, warmup=1, steps=2),
    Job("train", "tiny", bsz=2, seq=64, gc=True, warmup=1, steps=2),
    Job("train", "tiny", bsz=2, seq=64, gc=True, warmup=1, steps=2, nf4=True),
    Job("loss", "tiny", bsz=2, seq=32, steps=5),
    Job("decode", "tiny", bsz=1, seq=8, new=8),
    Job("decode", "tiny", bsz=2, seq=8, new=8),
    Job("adapters", "tiny", bsz=4, seq=8, new=8),
    Job("streams", "tiny", bsz=4, seq=8, new=8),
]
QUICK_GPU_PLAN = [Job("ceilings"), Job("kernels", "tiny", bsz=2, seq=64), *QUICK_PLAN,
                  Job("longest", "tiny", seq=1024, cap=8192, granularity=1024, deadline=30)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="the CPU plan: SmolLM2-135M shape, fp32")
    where.add_argument("--gpu", action="store_true",
                       help="the GPU plan: SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes, bf16 (the default "
                            "when a GPU is present)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny shapes, a few steps: checks the script in seconds")
    size.add_argument("--check", action="store_true",
                      help="the GPU plan cut to bench/gpu_check.sh's time limits (GPU only)")
    ap.add_argument("--only", default="", help=f"comma-separated works to run, of: {', '.join(WORKS)} "
                                               "(decode and kernels bring the ceilings row on a GPU)")
    ap.add_argument("--longest-cap", type=int, default=None,
                    help="longest sequence probed (tokens; overrides the plan's caps)")
    ap.add_argument("--longest-deadline", type=float, default=None,
                    help="seconds each side's longest-sequence search may take before it reports the bracket found "
                         "so far (overrides the plan's; 0: no limit)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's choice). On a machine shared with other work use "
                         "1: no thread then waits on a sibling that lost its core, and runs are timed in CPU time")
    ap.add_argument("--json", metavar="PATH", help="write an env line and one JSON object per row to PATH")
    args = ap.parse_args(argv)
    args.only = {w.strip() for w in args.only.split(",") if w.strip()}
    if args.only - set(WORKS):
        ap.error(f"--only takes {', '.join(WORKS)}, not {', '.join(sorted(args.only - set(WORKS)))}")
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs a CUDA GPU and none is visible")
    if args.check and (args.cpu or not torch.cuda.is_available()):
        ap.error("--check is a GPU plan (Llama-8B shapes); on the CPU use --quick")
    return args


def select(args: argparse.Namespace, device: torch.device) -> list[Job]:
    if args.quick:
        jobs = QUICK_GPU_PLAN if device.type == "cuda" else QUICK_PLAN
    elif args.check:
        jobs = CHECK_PLAN
    else:
        jobs = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    if args.longest_cap:
        jobs = [dataclasses.replace(j, cap=args.longest_cap) if j.work == "longest" else j for j in jobs]
    if args.longest_deadline is not None:
        jobs = [dataclasses.replace(j, deadline=args.longest_deadline) if j.work == "longest" else j for j in jobs]
    if not args.only:
        return jobs
    wanted = args.only | ({"ceilings"} if args.only & {"decode", "kernels"} else set())
    return [j for j in jobs if j.work in wanted]


def _cmd(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def commit_id() -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes?): $BENCH_COMMIT, else bench/COMMIT, else git's. `bash bench/gpu_check.sh stamp`
    writes bench/COMMIT before the device calls (deleted after them), and it wins over git: the device machine's copy
    of the tree once held a stale .git that named a commit two behind. A "-dirty" suffix says the tree had changes."""
    stamp = os.environ.get("BENCH_COMMIT", "").strip()
    if not stamp:
        with contextlib.suppress(OSError):
            stamp = COMMIT_FILE.read_text().strip()
    if not stamp and _cmd("git", "rev-parse", "--show-toplevel") == str(ROOT):  # not some enclosing repository
        return (_cmd("git", "rev-parse", "--short", "HEAD"),
                bool(_cmd("git", "status", "--porcelain", "--untracked-files=no")))
    if not stamp:
        return None, None
    return stamp.removesuffix("-dirty"), stamp.endswith("-dirty")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)" if names else platform.processor()
    except OSError:
        return platform.processor()


def environment(device: torch.device, plan: str) -> dict[str, Any]:
    from unsloth_core.kernels import get_backend

    commit, dirty = commit_id()
    env: dict[str, Any] = {"kind": "env", "plan": plan, "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "commit": commit, "dirty": dirty, "torch": torch.__version__}
    for pkg in ("transformers", "peft", "triton"):
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = None
    env.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", cpu=cpu_model(),
               torch_threads=torch.get_num_threads(), loadavg=[round(x, 2) for x in os.getloadavg()],
               dtype="bf16" if device.type == "cuda" else "fp32", kernels=get_backend())
    return env


def run_job(job: Job, device: torch.device, dtype: torch.dtype, state: dict[str, Any],
            progress: Progress) -> list[Row]:
    """The job's rows: one, except `kernels` (one per op). Partial results, where a work has them, go to
    `progress` as they come."""
    if job.work == "kernels":
        return kernel_rows(job, device, dtype)
    if job.work == "adapters":
        return adapters_rows(job, device, dtype)
    if job.work == "streams":
        return [streams_row(job, device, dtype)]
    if job.work == "served-step":
        return [served_step_row(job, device, dtype)]
    if job.work == "adapter-load":
        return [adapter_load_row(job, device, dtype)]
    if job.work == "long-prompt":
        return [long_prompt_row(job, device, dtype)]
    if job.work == "grpo":
        return [grpo_row(job, device, dtype)]
    return [one_row(job, device, dtype, state, progress)]


def one_row(job: Job, device: torch.device, dtype: torch.dtype, state: dict[str, Any], progress: Progress) -> Row:
    if job.work == "ceilings":
        row = ceilings(device)
        state["copy_tb_s"] = row.extra["copy_tb_s"]
        return row
    if job.work == "train":
        return train(job, device, dtype)
    if job.work == "loss":
        return loss_agreement(job, device, dtype)
    if job.work == "longest":
        if device.type != "cuda":
            raise RuntimeError("the longest-sequence search runs on a GPU only (it looks for the OOM)")
        return longest(job, device, dtype, progress)
    # Five timed runs each on the CPU, alternating (the best counts), to see past a shared machine; one on a GPU.
    return decode(job, device, dtype, state.get("copy_tb_s"), reps=1 if device.type == "cuda" else 5)


def prime(device: torch.device, dtype: torch.dtype) -> None:
    """One tiny step of each side first, so one-time costs (thread pools, allocator arenas, lazy imports) land on
    no row's time or memory: otherwise the first side measured pays them."""
    train(Job("train", "tiny", bsz=1, seq=16, warmup=1, steps=1), device, dtype)
    if device.type == "cpu":  # on a GPU this would compile a decode step for nothing
        decode(Job("decode", "tiny", bsz=1, seq=4, new=2), device, dtype, None)


@contextlib.contextmanager
def quiet(threads: int | None) -> Iterator[None]:
    """Torch's thread count as asked, and transformers' deprecation notices and GC/cache remarks (which would drown
    the progress lines) silenced; both restored after, for callers that run the bench in-process."""
    import transformers

    before = torch.get_num_threads(), transformers.logging.get_verbosity()
    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            yield
    finally:
        torch.set_num_threads(before[0])
        transformers.logging.set_verbosity(before[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with quiet(args.threads):
        rows = run(args)
    print_table(rows, sys.stdout)
    return 0


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = ("quick-" if args.quick else "check-" if args.check else "") + device.type
    env = environment(device, plan)
    print(f"# bench {plan}: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"{env['device']}, {env['cpu']}, torch threads {env['torch_threads']}, commit {env['commit']}, "
          f"load {env['loadavg']}", flush=True)
    sink = open(args.json, "w") if args.json else None  # noqa: SIM115 (rows are appended as they finish)

    def emit(obj: dict[str, Any]) -> None:
        if sink is not None:
            sink.write(json.dumps(obj) + "\n")
            sink.flush()  # a run cut short still leaves its finished rows

    def partial(job: Job) -> Progress:
        """A job's partial results as "partial" lines, each written the moment it is known (a longest-sequence
        search can outlast a caller's time limit; what it found by then stays in the file)."""
        def report(obj: dict[str, Any]) -> None:
            print(f"#   {json.dumps(obj)}", file=sys.stderr, flush=True)
            emit({"kind": "partial", "work": job.work, "shape": job.shape, "setting": job.setting, **obj})

        return report

    rows: list[Row] = []
    state: dict[str, Any] = {}
    try:
        emit(env)
        if not args.quick:
            prime(device, dtype)
        for job in select(args, device):
            print(f"# {job.work} {job.shape} {job.setting}", file=sys.stderr, flush=True)
            try:
                done = run_job(job, device, dtype, state, partial(job))
            except Exception as e:  # record and go on: one failure must not lose the other rows
                done = [Row(job.work, job.shape, job.setting, "", errors={"row": short(e)})]
            rows += done
            for row in done:
                emit({"kind": job.work, **row.to_json()})
    finally:
        if sink is not None:
            sink.close()
    return rows
