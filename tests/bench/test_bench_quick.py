"""The benchmark script itself, on tiny shapes: its table, its JSON lines and the loss agreement. Never timed:
no assertion here is about speed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import bench.kernels
import bench.run
import bench.workloads
from bench.run import main, parse_args, select
from bench.workloads import (
    Bracket,
    Job,
    compare,
    decode_setting,
    is_oom,
    longest,
    longest_side,
    max_rel_diff,
    search_longest,
    train_builders,
)

CPU = torch.device("cpu")


def test_quick_plan_prints_one_table_and_json_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rows.jsonl"
    threads = torch.get_num_threads()
    # One thread: on a busy machine tiny ops otherwise wait on a descheduled sibling thread.
    assert main(["--quick", "--cpu", "--threads", "1", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # put back for the tests that follow
    env, *rows = [json.loads(line) for line in path.read_text().splitlines()]

    assert env["kind"] == "env" and env["device"] == "cpu" and env["torch_threads"] == 1
    for key in ("torch", "transformers", "peft", "triton", "commit", "date", "loadavg"):
        assert key in env
    assert [r["kind"] for r in rows] == ["train", "train", "train", "loss", "decode", "decode", "adapters",
                                         "adapters", "streams"]
    assert rows[2]["work"] == "QLoRA train" and "NF4" in rows[2]["setting"]
    # A 4-bit base is not the 16-bit one, but the loss curves stay close (a broken build gives NaN or nonsense).
    assert rows[2]["extra"]["max_rel_loss_diff"] <= 0.01
    for r in rows:
        assert r["errors"] == {}, r["errors"]
        assert r["shape"] == "tiny"
        assert r["ours"] > 0 and r["hf"] > 0
        if r["unit"] == "tok/s":
            assert r["ratio"] == pytest.approx(r["ours"] / r["hf"], rel=1e-2)

    loss = rows[3]
    assert loss["extra"]["within_tolerance"]
    assert loss["extra"]["max_rel_diff"] <= 0.01
    assert len(loss["extra"]["losses"]["ours"]) == len(loss["extra"]["losses"]["hf"]) == 5
    for r in rows[4:6]:
        assert r["extra"]["same_tokens_as_hf"] == 1.0  # fp32 greedy on the same weights

    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, rule, one line per row: one table
    assert [c.strip() for c in table[0].strip("|").split("|")][:5] == ["work", "shape", "setting", "ours",
                                                                       "HF + PEFT"]


def test_only_filters_the_plan() -> None:
    args = parse_args(["--quick", "--cpu", "--only", "loss,decode"])
    assert [j.work for j in select(args, torch.device("cpu"))] == ["loss", "decode", "decode"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "nothing"])


@pytest.mark.parametrize(("limit", "cap", "expected"), [
    (57344, 131072, (57344, 59392)),  # HF's Llama-8B figure on an H200: OOM at 59,392
    (500_000, 131072, (131072, None)),  # the cap fits: the answer is a lower bound
    (1000, 131072, (0, 2048)),  # not even the first granule fits
])
def test_longest_search_doubles_then_bisects(limit: int, cap: int, expected: tuple[int, int | None]) -> None:
    probed: list[int] = []

    def fits(n: int) -> bool:
        probed.append(n)
        return n <= limit

    assert search_longest(fits, 8192, 2048, cap) == Bracket(*expected)
    assert all(n % 2048 == 0 and n <= cap for n in probed)
    assert len(probed) == len(set(probed))  # no length is probed twice


@pytest.mark.parametrize(("deadline", "expected"), [
    (30, Bracket(32768, None, "deadline")),  # 65,536 would take 64 s: not started
    (100, Bracket(32768, 65536, "deadline")),  # it fails, and 49,152 (36 s) would end past 100 s
    (1000, Bracket(57344, 59392)),  # time enough: the search finishes
])
def test_longest_search_stops_before_a_probe_would_pass_its_deadline(deadline: float, expected: Bracket) -> None:
    """A probe's time grows with the square of its length (attention-bound): the search predicts the next probe's
    from the longest that fitted and starts none that would end past the deadline, keeping the bracket so far."""
    now = [0.0]

    def fits(n: int) -> bool:
        now[0] += (n / 8192) ** 2
        return n <= 57344

    assert search_longest(fits, 8192, 2048, 131072, deadline=deadline, clock=lambda: now[0]) == expected
    assert now[0] <= deadline


def test_longest_search_keeps_its_bracket_when_a_probe_raises() -> None:
    def fits(n: int) -> bool:
        if n == 32768:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return True

    assert search_longest(fits, 8192, 2048, 131072) == Bracket(
        16384, None, "error", "RuntimeError: CUDA error: an illegal memory access was encountered")


def test_library_allocation_failures_count_as_out_of_memory() -> None:
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))


def fake_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides' training steps replaced: up to 128 tokens fit, 256 and more run out of cuBLAS workspace, and 192
    hits a bug (not an OOM)."""
    def step(x: Tensor) -> Tensor:
        if x.shape[1] >= 256:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        if x.shape[1] == 192:
            raise ValueError("boom")
        return x.float().mean()

    monkeypatch.setattr(bench.workloads, "ours_train_step", lambda *_, **__: step)
    monkeypatch.setattr(bench.workloads, "hf_train_step", lambda *_, **__: step)


def test_longest_side_records_an_error_and_keeps_what_it_found(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_steps(monkeypatch)
    events: list[dict[str, Any]] = []
    found = longest_side(Job("longest", "tiny", seq=64, cap=512, granularity=64), CPU, torch.float32, ours=True,
                         progress=events.append)
    assert (found["longest"], found["fails_at"], found["stopped"]) == (128, 256, "error")
    assert found["error"] == "ValueError: boom"
    assert [(p["seq"], p["ok"], p["why"]) for p in found["probes"]] == [
        (64, True, ""), (128, True, ""), (256, False, "OOM"), (192, False, "ValueError: boom")]
    # Each probe reported as it starts and as it ends: a run killed in the middle still shows where it was.
    assert [(e["event"], e["seq"]) for e in events] == [(ev, n) for n in (64, 128, 256, 192)
                                                         for ev in ("probing", "probe")]


def test_longest_row_reports_each_side_as_it_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_steps(monkeypatch)
    events: list[dict[str, Any]] = []
    row = longest(Job("longest", "tiny", seq=64, cap=512, granularity=64), CPU, torch.float32, events.append)
    sides = [e for e in events if e["event"] == "side"]
    assert [(e["side"], e["longest"], e["fails_at"]) for e in sides] == [("ours", 128, 256), ("hf", 128, 256)]
    assert row.ours == row.hf == 128
    assert row.errors == {"ours": "ValueError: boom", "hf": "ValueError: boom"}
    assert "between 128 and 256 (OOM), search stopped by an error" in row.note


def test_partial_results_reach_the_json_file_before_the_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.jsonl"

    def cut_short(*args: Any) -> list[Any]:
        progress = args[-1]  # run_job(job, device, dtype, state, progress)
        progress({"event": "probe", "side": "ours", "seq": 64, "ok": True})
        assert json.loads(path.read_text().splitlines()[-1])["kind"] == "partial"  # on disk already
        raise RuntimeError("cut short")

    monkeypatch.setattr(bench.run, "run_job", cut_short)
    assert main(["--quick", "--cpu", "--only", "loss", "--json", str(path)]) == 0
    env, partial, row = [json.loads(line) for line in path.read_text().splitlines()]
    assert env["kind"] == "env"
    assert partial == {"kind": "partial", "work": "loss", "shape": "tiny", "setting": "2x32, 5 steps",
                       "event": "probe", "side": "ours", "seq": 64, "ok": True}
    assert row["kind"] == "loss" and row["errors"] == {"row": "RuntimeError: cut short"}


def test_the_commit_comes_from_the_environment_or_the_stamp_without_git(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.run, "_cmd", lambda *_: None)  # no git, as on the device machine
    monkeypatch.setattr(bench.run, "COMMIT_FILE", tmp_path / "COMMIT")
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    assert bench.run.commit_id() == (None, None)
    (tmp_path / "COMMIT").write_text("abc1234-dirty\n")  # what `gpu_check.sh stamp` writes
    assert bench.run.commit_id() == ("abc1234", True)
    monkeypatch.setenv("BENCH_COMMIT", "def5678")
    assert bench.run.commit_id() == ("def5678", False)


def test_the_stamp_wins_over_a_git_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device machine's tree once held a stale .git: a stamp written for the calls names the commit."""
    answers = {("git", "rev-parse", "--show-toplevel"): str(bench.run.ROOT),
               ("git", "rev-parse", "--short", "HEAD"): "0ld0001"}
    monkeypatch.setattr(bench.run, "_cmd", lambda *args: answers.get(args))
    monkeypatch.setattr(bench.run, "COMMIT_FILE", tmp_path / "COMMIT")
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    assert bench.run.commit_id() == ("0ld0001", False)
    (tmp_path / "COMMIT").write_text("cc017ab\n")
    assert bench.run.commit_id() == ("cc017ab", False)


def test_the_check_plan_is_a_gpu_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--check", "--cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args(["--gpu", "--check", "--only", "decode,longest"])
    jobs = select(args, torch.device("cuda"))
    # Two decode rows (each compiles cold), one longest-sequence search with a deadline.
    assert [(j.work, j.shape, j.bsz) for j in jobs] == [("ceilings", "", 1), ("decode", "llama-1b", 1),
                                                         ("decode", "llama-1b", 32), ("longest", "llama-1b", 1)]
    assert jobs[-1].deadline > 0
    args = parse_args(["--gpu", "--check", "--only", "longest", "--longest-deadline", "0"])
    assert select(args, torch.device("cuda"))[0].deadline == 0


@pytest.mark.parametrize(("device", "compiled", "setting"), [
    ("cuda", None, "bsz 1, 128+256, compiled (CUDA graphs)"),  # the GPU default, labelled
    ("cuda", False, "bsz 1, 128+256"),
    ("cpu", None, "bsz 1, 128+256"),
    ("cpu", True, "bsz 1, 128+256, compiled"),
])
def test_decode_rows_say_when_ours_ran_compiled(device: str, compiled: bool | None, setting: str) -> None:
    job = Job("decode", "llama-1b", bsz=1, seq=128, new=256, compiled=compiled)
    assert decode_setting(job, torch.device(device)) == setting


def test_kernel_timing_on_the_cpu_times_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_do_bench() -> None:
        raise AssertionError("do_bench times on a GPU only")

    monkeypatch.setattr(bench.kernels, "triton_do_bench", no_do_bench)
    calls = []

    def call() -> None:
        calls.append(torch.ones(1000).sum())

    seconds, _, how = bench.kernels.time_calls(call, CPU, warmup=2, reps=5)
    assert len(calls) == 7 and seconds > 0
    assert how == "median of 5 calls after 2 warm-up"


def test_one_side_at_a_time_starts_both_from_the_same_weights() -> None:
    """The GPU's order (build, measure, free, then the other side), run on the CPU: HF's LoRA init is a copy of
    ours taken before ours trained, so the two loss curves still agree."""
    job = Job("loss", "tiny", bsz=2, seq=32, steps=3)
    outs = compare(train_builders(job, CPU, torch.float32), 64, 1, job.steps, CPU, interleave=False)
    assert all(o.error is None and o.tok_s and len(o.outputs) == 4 for o in outs.values())
    assert max_rel_diff([float(x) for x in outs["ours"].outputs], [float(x) for x in outs["hf"].outputs]) < 1e-5


def test_longest_search_runs_real_steps() -> None:
    found = longest_side(Job("longest", "tiny", seq=64, cap=256, granularity=64), CPU, torch.float32, ours=True)
    # Nothing runs out of memory on a tiny model.
    assert (found["longest"], found["fails_at"], found["stopped"], found["error"]) == (256, None, None, None)
    assert [p["seq"] for p in found["probes"]] == [64, 128, 256]


def test_kernel_rows_time_each_kernel_and_its_twin() -> None:
    """Under Triton's interpreter on the CPU (the timings mean nothing here; the GPU plan runs them for real)."""
    from bench.kernels import kernel_rows
    from bench.workloads import Job
    from unsloth_core.kernels.backend import AUTO_TRITON_OPS, get_backend

    before = get_backend()
    rows = kernel_rows(Job("kernels", "tiny", bsz=2, seq=16), CPU, torch.float32, warmup=1, reps=1)
    assert get_backend() == before
    assert [r.shape for r in rows] == ["rms_norm", "rope", "swiglu", "cross_entropy", "nf4_dequantize", "lora_bgmv"]
    for r in rows:
        assert r.errors == {} and r.ours and r.hf and r.unit == "calls/s"
        assert r.timing == "median of 1 calls after 1 warm-up"
        assert r.extra["auto_triton"] == (r.shape in AUTO_TRITON_OPS)


def test_an_error_names_the_line_of_ours_it_came_from() -> None:
    """A row keeps one line of an error, not its traceback: the innermost engine or bench line says where."""
    from bench.workloads import short
    from unsloth_core.config import LlamaConfig

    with pytest.raises(KeyError) as caught:
        LlamaConfig.from_name("nope")
    assert re.fullmatch(r"KeyError: .*unknown preset 'nope'.* \[at unsloth_core/config\.py:\d+\]", short(caught.value))


def test_profile_agreement_and_profiles_run_on_the_tiny_shape() -> None:
    """bench/profile.py on the CPU: in fp32 the two models agree at every position; a decode profile comes back."""
    import bench.profile

    text = bench.profile.agreement("tiny", CPU, torch.float32, 2, 8, 8)
    assert "HF's argmax = ours' generated token: 100.0%" in text
    assert "every position: 100.0%" in text
    decode = bench.profile.decode_profile("tiny", CPU, torch.float32, 1, 8, 4)
    assert "ms a step unprofiled" in decode and "Self CPU time total" in decode


def test_serving_rows_on_the_tiny_shape() -> None:
    """bench/serving.py: the mixed-adapter rows (against one engine per adapter, and against the base) and the
    concurrent-streams row come back with figures; the random adapters load as the server loads them."""
    from bench.serving import adapters_rows, streams_row

    rows = adapters_rows(Job("adapters", "tiny", bsz=3, seq=4, new=4), CPU, torch.float32)
    assert [r.work for r in rows] == ["mixed adapters"] * 2
    assert all(r.ours and r.hf and not r.errors for r in rows)
    assert rows[0].ours == rows[1].ours  # the same mixed run against two peers
    row = streams_row(Job("streams", "tiny", bsz=3, seq=4, new=4), CPU, torch.float32)
    assert row.ours and row.hf and len(row.extra["ttft_s"]) == 3 and "time to first token" in row.note


def test_the_served_step_row_compares_the_compiled_step_with_the_eager_one() -> None:
    from bench.serving import served_step_row

    row = served_step_row(Job("served-step", "tiny", bsz=2, seq=4, new=4), CPU, torch.float32)
    assert row.ours and row.hf and not row.errors
    assert row.note == "peer: the same engine's eager step (the previous design)"  # compiled, no fallback


def test_the_adapter_load_row_compares_gaps_around_the_loads() -> None:
    """bench/serving.py's adapter-load row: the gaps of running streams that overlap the loads against their steady
    gaps; 400 new tokens keep the streams running well past the loads on the tiny shape."""
    from bench.serving import adapter_load_row

    row = adapter_load_row(Job("adapter-load", "tiny", bsz=2, seq=4, new=400), CPU, torch.float32, loads=2)
    assert not row.errors and row.ours and row.hf, row.errors
    assert row.extra["gaps_during"] >= 2 and row.extra["gaps_steady"] > 0  # each stream spans the loads


def test_the_long_prompt_row_compares_chunked_and_whole_prefill() -> None:
    """bench/serving.py's long-prompt row runs both sides and reports each one's longest gap."""
    from bench.serving import long_prompt_row

    row = long_prompt_row(Job("long-prompt", "tiny", bsz=2, seq=4, new=40, long=400), CPU, torch.float32, chunk=64)
    assert not row.errors and row.ours is not None and row.hf is not None and row.ours > 0 and row.hf > 0
