"""The trainer: exact resume, gradient accumulation, packing, hooks, schedules, DPO."""

from __future__ import annotations

import copy
import importlib
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_tiny_tokenizer, tiny_model, tiny_model_dir
from unsloth_core.data import collate, pack, tokenize_sft
from unsloth_core.data.examples import TextExample
from unsloth_core.data.synthetic import fact_rows, made_up_facts, preference_rows, write_jsonl
from unsloth_core.finetune import finetune, load_base, prepare_datasets
from unsloth_core.lora import LoRAConfig, apply_lora, load_adapter
from unsloth_core.train_checkpoint import list_checkpoints
from unsloth_core.trainer import StopRequest, TrainArgs, Trainer, TrainerCallbacks, lr_at

LORA = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), std=0.05)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", fact_rows(24, seed=1))


def args(out: Path, **kw: Any) -> TrainArgs:
    base = dict(output_dir=str(out), micro_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
                learning_rate=5e-3, max_seq_length=128, seed=7, logging_steps=1)
    return TrainArgs(**{**base, **kw})


class StopAt(TrainerCallbacks):
    def __init__(self, step: int, request: StopRequest = "pause") -> None:
        self.step, self.request, self.logs, self.checkpoints = step, request, [], []
        self.current = 0

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(metrics)
        self.current = metrics["step"]

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        self.checkpoints.append((step, path))

    def should_stop(self) -> StopRequest:
        return self.request if self.current >= self.step else None


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_resume_is_bit_identical(tmp_path: Path, model_dir: Path, sft_file: Path) -> None:
    """Pause after 3 steps, resume from that checkpoint in a fresh process state, finish: same bits as one run."""
    straight, _ = finetune(model_dir, sft_file, args(tmp_path / "a", save_steps=2), LORA)
    assert straight.status == "completed"
    stopper = StopAt(3)
    paused, _ = finetune(model_dir, sft_file, args(tmp_path / "b", save_steps=2), LORA, callbacks=stopper)
    assert paused.status == "paused" and paused.step == 3 and paused.checkpoint is not None
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    resumed, final = finetune(model_dir, sft_file, args(tmp_path / "b", save_steps=2), LORA, resume="latest")
    assert resumed.status == "completed" and resumed.step == 6
    a, b = adapter_tensors(tmp_path / "a" / "final"), adapter_tensors(final)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.trained_tokens == straight.trained_tokens


def test_qlora_in_bf16_resumes_bit_identical(tmp_path: Path, model_dir: Path, sft_file: Path) -> None:
    """load_in_4bit: the base is quantized again on resume, to the same bits, so resume stays exact; the adapter
    differs from one trained on the 16-bit base (the base really is 4-bit); full fine-tuning is refused."""
    qlora = {"load_in_4bit": True, "dtype": "bfloat16", "save_steps": 2}
    straight, _ = finetune(model_dir, sft_file, args(tmp_path / "a", **qlora), LORA)
    assert straight.status == "completed"
    finetune(model_dir, sft_file, args(tmp_path / "b", **qlora), LORA, callbacks=StopAt(3))
    resumed, final = finetune(model_dir, sft_file, args(tmp_path / "b", **qlora), LORA, resume="latest")
    assert resumed.status == "completed" and resumed.step == 6
    a, b = adapter_tensors(tmp_path / "a" / "final"), adapter_tensors(final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    finetune(model_dir, sft_file, args(tmp_path / "c", dtype="bfloat16"), LORA)
    sixteen = adapter_tensors(tmp_path / "c" / "final")
    assert any(not torch.equal(a[k], sixteen[k]) for k in a if "lora_A" in k)
    with pytest.raises(ValueError, match="load_in_4bit"):
        finetune(model_dir, sft_file, args(tmp_path / "d", load_in_4bit=True), None)
    with pytest.raises(ValueError, match="load_in_4bit must be true or false"):
        args(tmp_path / "e", load_in_4bit="maybe")  # e.g. a mistyped --load-in-4bit value


def test_torn_checkpoint_is_ignored_and_removed(tmp_path: Path, model_dir: Path, sft_file: Path) -> None:
    finetune(model_dir, sft_file, args(tmp_path, save_steps=2, max_steps=4), LORA, callbacks=StopAt(4))
    ckpts = tmp_path / "checkpoints"
    good = list_checkpoints(ckpts)[-1][1]
    torn = ckpts / "step-000099"
    shutil.copytree(good, torn)
    (torn / "manifest.json").unlink()  # the process died before the manifest was written
    assert list_checkpoints(ckpts)[-1][1] == good
    result, _ = finetune(model_dir, sft_file, args(tmp_path, save_steps=2, max_steps=5), LORA, resume="latest")
    assert result.status == "completed" and not torn.exists()


def test_gradient_accumulation_equals_a_big_batch() -> None:
    tok = make_tiny_tokenizer()
    rows = [tokenize_sft(TextExample(t), tok, 64) for t in ("short", "a somewhat longer text here", "mid size",
                                                             "x" * 40)]
    grads = []
    for micro, accum in ((4, 1), (1, 4)):
        model = apply_lora(tiny_model(seed=3, std=0.1), r=4, alpha=8, seed=0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        trainer = Trainer(model, TrainArgs(micro_batch_size=micro, gradient_accumulation_steps=accum, max_steps=1,
                                           output_dir="unused"), rows, pad_id=tok.pad_token_id or 0)
        trainer._train_window(next(trainer._windows()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).abs().max() <= 1e-6, n


def test_packed_batch_gives_the_same_loss() -> None:
    tok = make_tiny_tokenizer()
    rows = [tokenize_sft(TextExample(t), tok, 64) for t in ("one sample", "another, longer sample", "third")]
    model = tiny_model(seed=4, std=0.3)
    unpacked = collate(rows, tok.pad_token_id or 0)
    packed = collate(pack(rows, 64), tok.pad_token_id or 0)
    assert packed["input_ids"].size(0) == 1
    with torch.no_grad():
        a = model(unpacked["input_ids"], position_ids=unpacked["position_ids"], labels=unpacked["labels"])
        b = model(packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"])
    assert a.n_tokens is not None and b.n_tokens is not None and a.loss_sum is not None and b.loss_sum is not None
    assert int(a.n_tokens) == int(b.n_tokens)
    assert torch.allclose(a.loss_sum, b.loss_sum, rtol=1e-5)


def test_hooks_metrics_and_cancel(tmp_path: Path, model_dir: Path, sft_file: Path) -> None:
    stopper = StopAt(2, "cancel")
    result, final = finetune(model_dir, sft_file, args(tmp_path), LORA, callbacks=stopper)
    assert result.status == "cancelled" and result.step == 2
    assert not final.exists()  # a cancelled run leaves no final adapter
    first = stopper.logs[0]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "tokens_seen", "mean_token_accuracy",
                "epoch", "step"):
        assert key in first, key


def test_checkpoints_are_servable_adapters_and_pruned(tmp_path: Path, model_dir: Path, sft_file: Path) -> None:
    cb = StopAt(10**9)
    result, final = finetune(model_dir, sft_file, args(tmp_path, save_steps=1, save_total_limit=2), LORA,
                             callbacks=cb)
    assert [s for s, _ in cb.checkpoints] == list(range(1, 7))
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in kept] == [5, 6]
    for _, path in kept:
        assert (path / "adapter_config.json").is_file() and (path / "chat_template.jinja").is_file()
    assert (final / "adapter_model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert result.checkpoint == kept[-1][1]


def test_validation_split_eval_and_early_stopping(tmp_path: Path, model_dir: Path, sft_file: Path) -> None:
    cb = StopAt(10**9)
    result, _ = finetune(model_dir, sft_file, args(tmp_path, max_steps=40, eval_steps=1, validation_split=0.25,
                                                   early_stopping_patience=1, learning_rate=0.5), LORA,
                         callbacks=cb)
    evals = [m for m in cb.logs if "eval_loss" in m]
    assert evals and "eval_mean_token_accuracy" in evals[0]
    assert result.status == "early_stopped" and result.step < 40


def test_full_fine_tuning(tmp_path: Path, model_dir: Path, sft_file: Path) -> None:
    result, final = finetune(model_dir, sft_file, args(tmp_path, max_steps=2), None)
    assert result.status == "completed"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()


def test_lr_schedules() -> None:
    assert [lr_at(s, 10, 2, 1.0, "linear") for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_at(6, 10, 2, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(9, 10, 0, 1.0, "constant") == 1.0


def test_bad_arguments_are_refused() -> None:
    for kw in (dict(learning_rate=0), dict(micro_batch_size=0), dict(warmup_ratio=1.5), dict(method="ppo")):
        with pytest.raises(ValueError):
            TrainArgs(**kw)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit", "qlora"])
def test_dpo_raises_preference_accuracy(tmp_path: Path, model_dir: Path, load_in_4bit: bool) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(made_up_facts(16, seed=3)))
    a = args(tmp_path / "out", method="dpo", max_steps=30, learning_rate=2e-2, beta=0.5, eval_steps=30,
             micro_batch_size=4, gradient_accumulation_steps=1)
    tok = make_tiny_tokenizer()
    datasets = prepare_datasets(tok, a, data)
    model, _ = load_base(model_dir, load_in_4bit=load_in_4bit)
    apply_lora(model, r=8, alpha=16, seed=0)
    trainer = Trainer(copy.deepcopy(model), a, datasets.train, datasets.train, pad_id=tok.pad_token_id or 0)
    before = trainer.evaluate()
    cb = StopAt(10**9)
    trainer.callbacks = cb
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_rewards/accuracy"] <= 0.75
    assert after["eval_rewards/accuracy"] > before["eval_rewards/accuracy"]
    assert after["eval_rewards/margin"] > 0
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= cb.logs[0].keys()


def test_a_bad_validation_file_is_named_as_such(tmp_path: Path, sft_file: Path) -> None:
    from unsloth_core.data import DataFileError

    bad = tmp_path / "valid.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(DataFileError, match="in the validation file") as info:
        prepare_datasets(make_tiny_tokenizer(), args(tmp_path), sft_file, bad)
    assert info.value.role == "validation" and info.value.errors[0].line == 1


@pytest.mark.parametrize("trained", [["lm_head"], ["embed_tokens", "lm_head"], "full"])
def test_bf16_autocast_trains_fp32_heads_and_embeddings(tmp_path: Path, model_dir: Path, sft_file: Path,
                                                       trained: list[str] | str) -> None:
    """What a GPU runs by default (bf16 autocast; frozen weights bf16, trained ones fp32) with a trained head, a
    trained embedding (an fp32 residual stream into bf16 LoRA layers), or every weight: the fused Functions and the
    chunked loss meet mixed dtypes there, which `out=` products refuse. A tied embedding saved under both names
    loads back."""
    lora = None if trained == "full" else LoRAConfig(r=4, lora_alpha=8, modules_to_save=list(trained))
    log = StopAt(step=99)
    result, final = finetune(model_dir, sft_file, args(tmp_path, dtype="bfloat16", learning_rate=2e-3), lora,
                             callbacks=log)
    assert result.status == "completed"
    losses = [m["loss"] for m in log.logs if "loss" in m]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    if lora is not None:
        base, _ = load_base(model_dir)
        served = load_adapter(base, final)
        saved = adapter_tensors(final)
        for name in trained:
            key = f"base_model.model.{'model.' if name == 'embed_tokens' else ''}{name}.weight"
            module = served.model.embed_tokens if name == "embed_tokens" else served.lm_head
            torch.testing.assert_close(module.weight, saved[key].to(module.weight.dtype))


@pytest.mark.parametrize(("lora", "expected"), [(LORA, torch.bfloat16), (None, torch.float32)])
def test_a_frozen_base_loads_in_the_compute_dtype(tmp_path: Path, model_dir: Path, sft_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch, lora: LoRAConfig | None,
                                                   expected: torch.dtype) -> None:
    """LoRA's frozen base is read straight into bf16 (fp32 first would take twice the memory at load); full
    fine-tuning reads fp32 masters."""
    finetune_module = importlib.import_module("unsloth_core.finetune")
    dtypes: list[torch.dtype] = []
    real_load = finetune_module.load_model

    def load_model(*args: Any, **kwargs: Any) -> Any:
        dtypes.append(kwargs["dtype"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "load_model", load_model)
    result, _ = finetune(model_dir, sft_file, args(tmp_path, dtype="bfloat16", max_steps=1), lora)
    assert result.status == "completed" and dtypes == [expected]
