"""HF-format save/load: bit-exact round trips, shards, dtypes, transformers interop, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers import tiny_model
from unsloth_core.checkpoint import atomic_directory, is_complete, load_model, save_model
from unsloth_core.config import LlamaConfig
from unsloth_core.errors import ModelFormatError


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bit_exact(tmp_path: Path, tied: bool) -> None:
    model = tiny_model(seed=7, tie_word_embeddings=tied)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert is_complete(tmp_path / "m")
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_save_writes_index_and_loads(tmp_path: Path) -> None:
    model = tiny_model(seed=8)
    save_model(model, tmp_path / "m", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    loaded = load_model(tmp_path / "m")
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    model = tiny_model(seed=9)
    save_model(model, tmp_path / "m", dtype=dtype)
    assert LlamaConfig.from_file(tmp_path / "m").torch_dtype == str(dtype).removeprefix("torch.")
    loaded = load_model(tmp_path / "m")
    assert loaded.dtype == dtype
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(dtype))
    assert load_model(tmp_path / "m", dtype="float32").dtype == torch.float32


def test_transformers_loads_our_directory(tmp_path: Path) -> None:
    model = tiny_model(seed=10, tie_word_embeddings=False)
    save_model(model, tmp_path / "m", max_shard_bytes=100_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, 256, (2, 14))
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() <= 1e-4


def test_config_round_trip_keeps_llama3_scaling(tmp_path: Path) -> None:
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    cfg.save(tmp_path)
    again = LlamaConfig.from_file(tmp_path)
    assert again == cfg
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 32.0


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(tmp_path / "m")


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="unsupported model_type 'mistral'"):
        load_model(tmp_path / "m")


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    tiny_model().config.save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelFormatError, match="safetensors only"):
        load_model(tmp_path)


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="shape"):
        load_model(tmp_path / "m")


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("crash mid-write")
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []


def test_torn_directory_is_not_complete(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "m")
    assert is_complete(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"short")
    assert not is_complete(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()
    assert not is_complete(tmp_path / "m")
