"""The GRPO objective against TRL's GRPOTrainer on the same rollouts: advantages, masks, losses and gradients.

TRL's trainer is built on a tiny transformers Llama (saved to a temp dir: TRL loads its reference model from the
policy's path) and samples the completions; its `_generate_and_score_completions` gives the advantages and masks and
its `_compute_loss` the loss. Ours gets the same rewards, completions and per-token log-probabilities.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from tests.helpers import make_tiny_tokenizer
from unsloth_core.rl.grpo_loss import (
    GRPOLossConfig,
    combine_rewards,
    completion_mask,
    group_advantages,
    grpo_loss,
)

trl = pytest.importorskip("trl")
G = 4
PROMPTS = ["hello", "abc d", "zz"]
BETA = 0.04
MAX_COMPLETION = 8


class Rewards:
    """Two reward functions in TRL's signature that remember what they returned (the test's copy of the rewards).
    The second scores only completions of odd length (None otherwise), so some rows are scored by one function."""

    def __init__(self) -> None:
        self.returned: list[list[list[float | None]]] = []

    def letters(self, prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        out: list[float | None] = [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]
        self.returned.append([out])
        return out

    def vowels(self, prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        out = [float(sum(ch in "aeiou" for ch in c)) if len(c) % 2 else None for c in completions]
        self.returned[-1].append(out)
        return out

    def last(self) -> Tensor:
        """(rows, funcs) of the latest call, NaN for None."""
        columns = self.returned[-1]
        return torch.tensor([[float("nan") if v is None else v for v in row] for row in zip(*columns, strict=True)])


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Rewards]:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = make_tiny_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                     pad_token=tok.pad_token, padding_side="left")
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trl_tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    hf_tok.save_pretrained(path)
    rewards = Rewards()
    from datasets import Dataset

    # A bias toward EOS so that some completions end before MAX_COMPLETION and others are truncated.
    args = trl.GRPOConfig(output_dir=str(path / "out"), per_device_train_batch_size=G * len(PROMPTS),
                          num_generations=G, max_completion_length=MAX_COMPLETION, beta=BETA, report_to=[],
                          use_cpu=True, mask_truncated_completions=True, save_strategy="no", seed=0,
                          generation_kwargs={"sequence_bias": {(tok.eos_token_id,): 4.5}})
    trainer = trl.GRPOTrainer(model=str(path), reward_funcs=[rewards.letters, rewards.vowels], args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=hf_tok)
    # Move the policy away from the reference (the same weights at the start) so that the KL term is not 0.
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    return trainer, rewards


def rollout(trainer: Any, scale_rewards: str = "group") -> dict[str, Any]:
    trainer.scale_rewards, trainer.beta = scale_rewards, BETA  # beta > 0: the rollout computes ref_per_token_logps
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(trl_trainer: tuple[Any, Rewards], scale_rewards: str) -> None:
    trainer, rewards = trl_trainer
    inputs = rollout(trainer, scale_rewards)
    per_func = rewards.last()
    assert per_func.isnan().any() and (~per_func.isnan()).any(), "the rollout should exercise None rewards"
    ours = group_advantages(combine_rewards(per_func), G, scale_rewards)  # type: ignore[arg-type]
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, inputs["advantages"], atol=1e-6, rtol=0)


def test_truncated_completions_are_masked_as_trl_does(trl_trainer: tuple[Any, Rewards]) -> None:
    trainer, _ = trl_trainer
    inputs = rollout(trainer)
    ids: Tensor = inputs["completion_ids"]
    is_eos = ids == trainer.processing_class.eos_token_id
    ended = is_eos.any(dim=1)
    assert ended.any() and (~ended).any(), "the rollout should hold both finished and truncated completions"
    lengths = torch.where(ended, is_eos.int().argmax(dim=1) + 1, torch.full_like(ended, ids.size(1), dtype=torch.long))
    torch.testing.assert_close(completion_mask(lengths, ids.size(1), truncated=~ended),
                               inputs["completion_mask"].float(), atol=0, rtol=0)


def _ours_and_trls(trainer: Any, inputs: dict[str, Any], config: GRPOLossConfig
                   ) -> tuple[tuple[Tensor, list[Tensor], dict[str, float]], tuple[Tensor, list[Tensor]]]:
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                       inputs["completion_ids"].size(1))[0]
    ours, metrics = grpo_loss(logps, inputs["advantages"], inputs["completion_mask"].float(), config,
                              old_logps=inputs["old_per_token_logps"], ref_logps=inputs["ref_per_token_logps"])
    our_grads = torch.autograd.grad(ours, params)
    theirs = trainer._compute_loss(model, inputs)
    their_grads = torch.autograd.grad(theirs, params)
    return (ours.detach(), list(our_grads), metrics), (theirs.detach(), list(their_grads))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize(("beta", "bias_correction"), [(0.0, True), (BETA, True), (BETA, False)])
def test_loss_and_gradients_match_trl(trl_trainer: tuple[Any, Rewards], loss_type: str, beta: float,
                                      bias_correction: bool) -> None:
    trainer, _ = trl_trainer
    inputs = rollout(trainer)
    # A batch reused for a second iteration (num_iterations > 1): the sampling policy's log-probabilities differ
    # from the current ones by +-0.5 in a checkerboard, so the ratio is 0.61 or 1.65 and the clip bites at both ends.
    with torch.no_grad():
        completion = inputs["completion_ids"]
        now = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], completion], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), completion.size(1))[0]
    rows, cols = torch.meshgrid(torch.arange(now.size(0)), torch.arange(now.size(1)), indexing="ij")
    inputs["old_per_token_logps"] = now + 0.5 * (1 - 2 * ((rows + cols) % 2))
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = bias_correction
    trainer.epsilon_low, trainer.epsilon_high = 0.2, 0.28
    trainer._metrics["train"].clear()
    config = GRPOLossConfig(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,  # type: ignore[arg-type]
                            max_completion_length=MAX_COMPLETION, use_bias_correction_kl=bias_correction)
    (ours, our_grads, metrics), (theirs, their_grads) = _ours_and_trls(trainer, inputs, config)
    assert ours.abs() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    logged = trainer._metrics["train"]
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name] == pytest.approx(logged[name][-1], abs=1e-6)
    if beta:
        assert metrics["kl"] > 0 and metrics["kl"] == pytest.approx(logged["kl"][-1], abs=1e-6)


def test_one_iteration_gradient_is_the_policy_gradient() -> None:
    """With old = logps detached the ratio is 1, and grpo's gradient is that of -mean_rows(mean_tokens(A * logp))."""
    torch.manual_seed(0)
    logps = torch.randn(4, 5, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    mask = completion_mask(torch.tensor([5, 3, 1, 4]), 5)
    loss, _ = grpo_loss(logps, adv, mask, GRPOLossConfig(loss_type="grpo"))
    (grad,) = torch.autograd.grad(loss, logps)
    expected = -(adv[:, None] * mask / mask.sum(-1, keepdim=True)) / 4
    torch.testing.assert_close(grad, expected)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "grp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), GRPOLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="window_tokens"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), GRPOLossConfig(), accumulation_steps=2)

