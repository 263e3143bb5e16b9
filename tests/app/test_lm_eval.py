"""lm-evaluation-harness's `local-completions` backend against our server: its own API model class computes
log-likelihoods (echo + logprobs) and greedy generations over HTTP, as `lm_eval --model local-completions` would, on a
handful of hand-written requests (no task or dataset is downloaded). Its tokenizer is our model directory's, read by
transformers, so its context lengths line up with our token ids."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.app.conftest import TINY, Backend

lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")
Instance = pytest.importorskip("lm_eval.api.instance").Instance


def _model_loglikelihood(tiny_model_dir: Path, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's log-likelihood after the context and whether greedy decoding gives it, from our model's
    own logits (no server)."""
    from unsloth_core.checkpoint import load_model
    from unsloth_core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype=torch.float32).eval()
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    with torch.no_grad():
        lp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    positions = range(len(ctx), len(whole))
    total = sum(lp[i - 1, whole[i]].item() for i in positions)
    return total, all(lp[i - 1].argmax().item() == whole[i] for i in positions)


def test_lm_eval_local_completions_scores_and_generates(backend: Backend, tiny_model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if backend.name != "sqlite":
        pytest.skip("one backend is enough: the database plays no part")
    monkeypatch.setenv("OPENAI_API_KEY", backend.user_key)
    lm = lm_eval_api.LocalCompletionsAPI(model=TINY, base_url=backend.base_url + "/v1/completions",
                                         tokenizer_backend="huggingface", tokenizer=str(tiny_model_dir),
                                         max_length=256, max_gen_toks=8, num_concurrent=1)
    pairs = [("The cat sat on", " the mat"), ("Once upon", " a time"), ("abc", "d")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        expected, expected_greedy = _model_loglikelihood(tiny_model_dir, context, continuation)
        assert math.isfinite(logprob) and logprob == pytest.approx(expected, abs=1e-3)
        assert greedy == expected_greedy

    generate = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 6}))]
    text = lm.generate_until(generate, disable_tqdm=True)[0]
    direct = backend.client().completions.create(model=TINY, prompt="Once upon a time", max_tokens=6, temperature=0,
                                                 stop=["\n\n"])
    assert text == direct.choices[0].text
