"""GRPO as a training method: log-probabilities, the reference policy, learning, exact resume, TRL's arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_tiny_tokenizer, tiny_model, tiny_model_dir
from unsloth_core.checkpoint import load_model
from unsloth_core.data.synthetic import write_jsonl
from unsloth_core.finetune import finetune
from unsloth_core.lora import LoRAConfig, apply_lora, lora_layers
from unsloth_core.rl import GRPO, GRPOArgs, GRPOConfig, GRPOTrainer
from unsloth_core.rl.logprobs import completion_logprobs
from unsloth_core.rl.prompts import prompt_examples
from unsloth_core.trainer import StopRequest, TrainArgs, Trainer, TrainerCallbacks

TEMPERATURE = 0.7
LOWER = set("abcdefghijklmnopqrstuvwxyz")


@pytest.fixture(autouse=True)
def _in_a_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainers write their output_dir ("unused") relative to the working directory: keep it out of the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("grpo"), seed=1, std=0.3)


def lowercase(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:  # noqa: ARG001 (TRL's)
    """A reward the tiny random model earns rarely at first (~8% of its bytes are lowercase letters)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch in LOWER for ch in t) / 8 for t in texts]


class Record(TrainerCallbacks):
    def __init__(self, stop_at: int | None = None) -> None:
        self.logs: list[dict[str, Any]] = []
        self.rollouts: list[tuple[int, list[dict[str, Any]]]] = []
        self.stop_at = stop_at

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(metrics)

    def on_rollouts(self, step: int, rollouts: list[dict[str, Any]]) -> None:
        self.rollouts.append((step, rollouts))

    def should_stop(self) -> StopRequest:
        return "pause" if self.stop_at is not None and self.logs and self.logs[-1]["step"] >= self.stop_at else None


def rollout_rows(n_prompt: int = 5) -> tuple[torch.Tensor, list[int], list[int]]:
    """Three prompts of one length (TRL left-pads prompts and numbers positions from the padding: with equal
    lengths there is none) and completions of 6, 3 and 1 tokens, right-padded."""
    g = torch.Generator().manual_seed(0)
    lengths = [6, 3, 1]
    seq = torch.randint(0, 256, (3, n_prompt + 6), generator=g)
    for row, n in enumerate(lengths):
        seq[row, n_prompt + n:] = 256  # the pad id
    return seq, [n_prompt] * 3, lengths


def test_logprobs_match_a_plain_computation_and_trl(model_dir: Path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = load_model(model_dir)
    seq, starts, lengths = rollout_rows()
    ours, entropy = completion_logprobs(model, seq, starts, lengths, TEMPERATURE, with_entropy=True, chunk_tokens=4)
    assert entropy is not None
    for row, (s, n) in enumerate(zip(starts, lengths)):  # one row at a time, the whole distribution
        with torch.no_grad():
            logits = model(seq[row:row + 1, : s + n]).logits[0, s - 1: s + n - 1].float() / TEMPERATURE
        plain = logits.log_softmax(-1).gather(-1, seq[row, s: s + n, None])[:, 0]
        torch.testing.assert_close(ours[row, :n], plain, atol=1e-5, rtol=0)
        p = logits.softmax(-1)
        torch.testing.assert_close(entropy[row, :n], -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
        assert (ours[row, n:] == 0).all()

    tok = make_tiny_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                     pad_token=tok.pad_token, padding_side="left")
    hf_model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    config = trl.GRPOConfig(output_dir=str(model_dir.parent / "trl"), per_device_train_batch_size=3, num_generations=3,
                            temperature=TEMPERATURE, report_to=[], use_cpu=True, save_strategy="no", bf16=False)
    trainer = trl.GRPOTrainer(model=hf_model, reward_funcs=lowercase, args=config, processing_class=hf_tok,
                              train_dataset=Dataset.from_list([{"prompt": "x"}]))
    width = max(lengths)
    mask = torch.cat([torch.ones(3, starts[0], dtype=torch.long),
                      (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()], dim=1)
    with torch.no_grad():
        theirs, their_entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, seq[:, : starts[0] + width], mask, width, compute_entropy=True)
    valid = mask[:, starts[0]:].bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[valid], their_entropy[valid], atol=1e-5, rtol=0)


def test_the_reference_is_the_base_model(model_dir: Path) -> None:
    """beta > 0: the reference log-probabilities are the model's with its adapter switched off, which equal those
    of the base model itself (and differ from the adapted policy's)."""
    base = load_model(model_dir)
    model = apply_lora(load_model(model_dir), r=4, alpha=8, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    tok = make_tiny_tokenizer()
    method = GRPO(lowercase, GRPOArgs(num_generations=3, max_completion_length=6, beta=0.1,
                                      temperature=TEMPERATURE), tokenizer=tok)
    args = TrainArgs(output_dir="unused", method="grpo", micro_batch_size=2, gradient_accumulation_steps=3,
                     max_seq_length=64)
    trainer = Trainer(model, args, method.tokenize(prompt_examples([{"prompt": "x"}]), tok, args), method=method)
    seq, starts, lengths = rollout_rows()
    ref = method._reference_logps(trainer, seq, starts, lengths)
    with torch.no_grad():
        expected, _ = completion_logprobs(base, seq, starts, lengths, TEMPERATURE)
        adapted, _ = completion_logprobs(model, seq, starts, lengths, TEMPERATURE)
    torch.testing.assert_close(ref, expected, atol=1e-6, rtol=0)
    assert (adapted - expected).abs().max() > 1e-2
    assert all(not m.disabled for _, m in lora_layers(model))  # switched back on


def train_lowercase(learning_rate: float, steps: int = 24, **grpo: Any) -> Record:
    """LoRA on a tiny random model, 4 prompts x 8 completions of 8 tokens per step, rewarded for lowercase."""
    tok = make_tiny_tokenizer()
    model = apply_lora(tiny_model(seed=1, std=0.3), r=8, alpha=16, seed=0)
    method = GRPO(lowercase, GRPOArgs(num_generations=8, max_completion_length=8, **grpo), tokenizer=tok)
    args = TrainArgs(output_dir="unused", method="grpo", micro_batch_size=16, gradient_accumulation_steps=2,
                     max_steps=steps, learning_rate=learning_rate, max_seq_length=64, seed=0)
    prompts = method.tokenize(prompt_examples([{"prompt": p} for p in ("hello", "abc", "xyz", "qq")]), tok, args)
    record = Record()
    Trainer(model, args, prompts, callbacks=record, pad_id=tok.pad_token_id or 0, method=method).train()
    return record


def test_it_learns() -> None:
    """The same seeds, so the same draws while the weights are the same: with lr 2e-2 the mean reward of the
    last 5 steps is far above the first 5 and above a run whose weights barely move (lr 1e-12)."""
    def first_last(record: Record) -> tuple[float, float]:
        rewards = [m["reward"] for m in record.logs]
        return sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5

    trained = train_lowercase(2e-2)
    still = train_lowercase(1e-12)
    (t_first, t_last), (s_first, s_last) = first_last(trained), first_last(still)
    assert t_first < 0.3 and s_first < 0.3 and s_last < 0.3  # measured: 0.106, 0.075, 0.063
    assert t_last > 0.8  # measured: 0.929
    first = trained.logs[0]
    for key in ("reward", "reward_std", "rewards/lowercase/mean", "rewards/lowercase/std", "entropy",
                "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
                "time/generation_s", "time/training_s", "loss", "learning_rate", "grad_norm", "tokens_seen"):
        assert key in first, key
    assert first["time/generation_s"] > 0 and first["time/training_s"] > 0
    step, rollouts = trained.rollouts[0]
    assert step == 1 and len(rollouts) == 2 and len(rollouts[0]["completions"]) == 8
    assert set(rollouts[0]["completions"][0]) == {"text", "reward", "rewards", "advantage", "finish_reason",
                                                  "num_tokens"}


def grpo_method(**kw: Any) -> GRPO:
    weights = kw.pop("reward_weights", None)
    return GRPO([lowercase, length_rule], GRPOArgs(num_generations=4, max_completion_length=6, temperature=0.9,
                                                   reward_weights=weights, **kw))


def length_rule(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],  # noqa: ARG001
                **_: Any) -> list[float | None]:
    return [None if len(ids) % 3 == 0 else float(len(ids) < 5) for ids in completion_ids]


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("pause_at", [3, 4], ids=["mid-rollout", "rollout-boundary"])
def test_resume_is_bit_identical(tmp_path: Path, model_dir: Path, pause_at: int) -> None:
    """num_iterations 2 and beta > 0: paused at step 3 the checkpoint holds the rollout being reused (old and
    reference log-probabilities included); at step 4 the next step samples anew. Resumed, a fresh process state
    gives the same adapter bits and the same rewards as one run (chat prompts, dropout, two reward functions)."""
    rows = [{"messages": [{"role": "user", "content": q}], "answer": a}
            for q, a in (("hi", "x"), ("what?", "y"), ("abc", "z"), ("no", "w"))]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1)

    def args(out: str) -> TrainArgs:
        return TrainArgs(output_dir=str(tmp_path / out), method="grpo", micro_batch_size=4,
                         gradient_accumulation_steps=2, max_steps=6, learning_rate=2e-2, max_seq_length=64, seed=3,
                         save_steps=2)

    method = dict(num_iterations=2, beta=0.05, reward_weights=[1.0, 0.5])
    straight_log = Record()
    straight, final_a = finetune(model_dir, data, args("a"), lora, callbacks=straight_log,
                                 method=grpo_method(**method))
    assert straight.status == "completed" and straight.step == 6
    paused, _ = finetune(model_dir, data, args("b"), lora, callbacks=Record(stop_at=pause_at),
                         method=grpo_method(**method))
    assert paused.status == "paused" and paused.step == pause_at
    has_rollout = (paused.checkpoint / "method_state.safetensors").is_file()  # type: ignore[operator]
    assert has_rollout == (pause_at % 2 == 1)
    torch.manual_seed(999)  # disturb the global generator: resume restores it
    resumed_log = Record()
    resumed, final_b = finetune(model_dir, data, args("b"), lora, callbacks=resumed_log, resume="latest",
                                method=grpo_method(**method))
    assert resumed.status == "completed" and resumed.step == 6
    a, b = adapter(final_a), adapter(final_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["reward"] for m in straight_log.logs[pause_at:]] == [m["reward"] for m in resumed_log.logs]
    assert any(m["kl"] > 0 for m in straight_log.logs) and "rewards/length_rule/mean" in straight_log.logs[0]


def test_rewards_get_trls_arguments(model_dir: Path) -> None:
    """Chat prompts: prompts as messages, completions as [{"role": "assistant", "content": ...}], the dataset's
    other fields and completion_ids as keyword lists, one entry per completion."""
    seen: list[dict[str, Any]] = []

    def check(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        seen.append({"prompts": prompts, "completions": completions, **kwargs})
        return [float(len(c[0]["content"])) for c in completions]

    tok = make_tiny_tokenizer()
    model = apply_lora(load_model(model_dir), r=4, alpha=8, seed=0)
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "a"},
            {"prompt": [{"role": "user", "content": "yo"}], "answer": "b"}]
    config = GRPOConfig(output_dir="unused", per_device_train_batch_size=3, gradient_accumulation_steps=2,
                        num_generations=3, max_completion_length=5, max_steps=1, learning_rate=1e-3,
                        save_strategy="no", report_to="none", use_vllm=False, logging_steps=1, seed=0)
    result = GRPOTrainer(model=model, reward_funcs=[check], args=config, train_dataset=rows,
                         processing_class=tok).train()
    assert result.status == "completed"
    call = seen[0]
    order = [call["prompts"][0], call["prompts"][3]]  # the data order is shuffled; a prompt's group is together
    assert sorted(p[0]["content"] for p in order) == ["hi", "yo"]
    assert call["prompts"] == [p for p in order for _ in range(3)]
    answers = {"hi": "a", "yo": "b"}
    assert call["answer"] == [answers[p[0]["content"]] for p in call["prompts"]] and len(call["completion_ids"]) == 6
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in call["completions"])


def test_qlora_with_gradient_checkpointing_and_flags_restored(tmp_path: Path, model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ("hello", "abc")])
    args = TrainArgs(output_dir=str(tmp_path / "out"), method="grpo", micro_batch_size=4,
                     gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, max_seq_length=64, seed=0,
                     load_in_4bit=True, dtype="bfloat16", gradient_checkpointing=True)
    method = grpo_method(beta=0.05)
    log = Record()
    result, final = finetune(model_dir, data, args, LoRAConfig(r=4, lora_alpha=8), callbacks=log, method=method)
    assert result.status == "completed" and (final / "adapter_model.safetensors").is_file()
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in log.logs)
    model = method._generator.model  # type: ignore[union-attr]
    assert model.training and model.gradient_checkpointing is True and model.cache_shape is None


def test_bad_arguments_are_named(model_dir: Path) -> None:
    with pytest.raises(TypeError, match="num_genrations"):
        GRPOConfig(num_genrations=4)
    with pytest.raises(ValueError, match="use_vllm"):
        GRPOConfig(use_vllm=True)
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=1).grpo_args()
    with pytest.raises(ValueError, match="loss_type"):
        GRPOArgs(loss_type="ppo")  # type: ignore[arg-type]
    tok = make_tiny_tokenizer()
    model = apply_lora(load_model(model_dir), r=4, alpha=8, seed=0)
    rows = [{"prompt": "hi"}]
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOTrainer(model=model, reward_funcs=lowercase, processing_class=tok, train_dataset=rows,
                    args=GRPOConfig(per_device_train_batch_size=3, num_generations=2, max_completion_length=8))
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        GRPOTrainer(model=model, reward_funcs=lowercase, processing_class=tok, train_dataset=rows,
                    args=GRPOConfig(max_seq_length=64, max_completion_length=64))
    with pytest.raises(ValueError, match="processing_class"):
        GRPOTrainer(model=model, reward_funcs=lowercase, train_dataset=rows)
    with pytest.raises(ValueError, match="row 0"):
        GRPOTrainer(model=model, reward_funcs=lowercase, processing_class=tok, train_dataset=[{"text": "x"}])
    with pytest.raises(ValueError, match="reward functions"):
        Trainer(model, TrainArgs(method="grpo"), [object()])

    def short(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:  # noqa: ARG001
        return [1.0]

    trainer = GRPOTrainer(model=model, reward_funcs=short, processing_class=tok, train_dataset=rows,
                          args=GRPOConfig(output_dir="unused", per_device_train_batch_size=2, num_generations=2,
                                          max_completion_length=3, max_steps=1, save_strategy="no"))
    with pytest.raises(ValueError, match="'short' returned 1 rewards for 2 completions"):
        trainer.train()
