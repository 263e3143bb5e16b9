"""The benchmark script itself, on tiny shapes: its table, its JSON lines and the loss agreement. Never timed:
no assertion here is about speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.run import main, parse_args, select
from bench.workloads import Job, compare, longest_side, max_rel_diff, search_longest, train_builders

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
    assert [r["kind"] for r in rows] == ["train", "train", "train", "loss", "decode", "decode"]
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
    for r in rows[4:]:
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

    assert search_longest(fits, 8192, 2048, cap) == expected
    assert all(n % 2048 == 0 and n <= cap for n in probed)
    assert len(probed) == len(set(probed))  # no length is probed twice


def test_one_side_at_a_time_starts_both_from_the_same_weights() -> None:
    """The GPU's order (build, measure, free, then the other side), run on the CPU: HF's LoRA init is a copy of
    ours taken before ours trained, so the two loss curves still agree."""
    job = Job("loss", "tiny", bsz=2, seq=32, steps=3)
    outs = compare(train_builders(job, CPU, torch.float32), 64, 1, job.steps, CPU, interleave=False)
    assert all(o.error is None and o.tok_s and len(o.outputs) == 4 for o in outs.values())
    assert max_rel_diff([float(x) for x in outs["ours"].outputs], [float(x) for x in outs["hf"].outputs]) < 1e-5


def test_longest_search_runs_real_steps() -> None:
    found = longest_side(Job("longest", "tiny", seq=64, cap=256, granularity=64), CPU, torch.float32, ours=True)
    assert (found["longest"], found["fails_at"]) == (256, None)  # nothing runs out of memory on a tiny model
    assert [p["seq"] for p in found["probes"]] == [64, 128, 256]


def test_kernel_rows_time_each_kernel_and_its_twin() -> None:
    """Under Triton's interpreter on the CPU (the timings mean nothing here; the GPU plan runs them for real)."""
    from bench.kernels import kernel_rows
    from bench.workloads import Job
    from unsloth_core.kernels.backend import AUTO_TRITON_OPS, get_backend

    before = get_backend()
    rows = kernel_rows(Job("kernels", "tiny", bsz=2, seq=16), CPU, torch.float32, warmup=1, reps=1)
    assert get_backend() == before
    assert [r.shape for r in rows] == ["rms_norm", "rope", "swiglu", "cross_entropy", "nf4_dequantize"]
    for r in rows:
        assert r.errors == {} and r.ours and r.hf and r.unit == "calls/s"
        assert r.extra["auto_triton"] == (r.shape in AUTO_TRITON_OPS)
