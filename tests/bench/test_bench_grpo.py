"""bench/grpo.py on the tiny shape: ours and TRL's GRPOTrainer each run in a process of their own and come back as one
row. Never timed: no assertion here is about speed."""

from __future__ import annotations

import pytest
import torch

from bench.grpo import backend, grpo_row, prompt_texts, reward_lowercase
from bench.run import CPU_PLAN, parse_args, select
from bench.workloads import Job

pytest.importorskip("trl")


def test_the_row_runs_both_trainers_on_the_same_work() -> None:
    job = Job("grpo", "tiny", bsz=2, generations=4, seq=8, new=6, warmup=1, steps=2)
    row = grpo_row(job, torch.device("cpu"), torch.float32)
    assert row.errors == {}, row.errors
    assert (row.work, row.shape, row.setting, row.unit) == ("GRPO", "tiny", "2 prompts x G 4, 8+6", "steps/min")
    assert row.setting == job.setting  # the progress line names the row as the table does
    assert row.ours and row.hf and row.ours > 0 and row.hf > 0
    assert row.ratio == pytest.approx(row.ours / row.hf)
    assert row.ours_mem_gib is not None and row.hf_mem_gib is not None
    assert 0 <= row.ours_mem_gib < 2 and 0 <= row.hf_mem_gib < 2  # a tiny model: nothing near a GiB
    x = row.extra
    for side in ("ours", "trl"):
        assert len(x["wall_s"][side]) == len(x["cpu_s"][side]) == 3  # warm-up + timed steps
        assert all(t > 0 for t in x["cpu_s"][side])
        assert len(x["generation_cpu_s"][side]) == 3  # one sampling call a step
        # The same work on both sides: every completion runs to max_completion_length, none stops early.
        assert x["mean_completion_length"][side] == [6.0] * 3
        assert all(0 <= r <= 1 for r in x["reward"][side])
        assert x["peak_rss_gib"][side] > 0.1  # a process with torch in it
    assert "mean completion length ours 6, trl 6" in row.note


def test_every_id_decodes_to_text_and_prompts_are_one_token_a_byte() -> None:
    tok = backend(320)
    assert tok.get_vocab_size() == 320
    assert tok.decode([300]) == " w300"
    texts = prompt_texts(3, 8)
    assert len(set(texts)) == 3 and all(len(tok.encode(t).ids) == 8 for t in texts)
    assert reward_lowercase(["p"] * 2, ["ab  ", [{"role": "assistant", "content": "A"}]]) == [0.5, 0.0]


def test_the_cpu_plan_has_a_grpo_row() -> None:
    jobs = select(parse_args(["--cpu", "--only", "grpo"]), torch.device("cpu"))
    assert jobs and all(j.work == "grpo" and j.generations >= 2 for j in jobs)
    assert jobs == [j for j in CPU_PLAN if j.work == "grpo"]
