"""GGUF import on files written here with the gguf package: names, the Q/K permutation, metadata, errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tests.helpers import make_tiny_tokenizer, tiny_model
from unsloth_core.checkpoint import load_model
from unsloth_core.errors import ModelFormatError
from unsloth_core.gguf_import import TENSOR_NAMES, default_model_gguf, import_gguf, reader_class
from unsloth_core.model import Llama
from unsloth_core.tokenizer import Tokenizer

HF_TO_GGUF = {hf: g for g, hf in TENSOR_NAMES.items()}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion (convert_hf_to_gguf.py): rows of each head reordered for its interleaved RoPE."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# A SentencePiece BPE vocabulary as llama.cpp stores one (Llama 2, Mistral): specials, 256 byte tokens, pieces.
S = "\u2581"  # SentencePiece's space
SPM_CHARS = list(S + "abcdefghijklmnopqrstuvwxyzHW,.!?")
SPM_PIECES = [S + "t", "he", S + "the", S + "w", "or", "ld", S + "wor", S + "world", S + "h", "ll", S + "he",
              S + "hell", S + "hello", "in", "ing", S + "a", "an", S + "an", S + "and", "is", S + "is", "er", "re",
              S + "here", S + S, S + "W", S + "H"]


def add_spm_vocab(w: gguf.GGUFWriter, vocab_size: int) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + SPM_CHARS
    assert len(tokens) <= vocab_size
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_PIECES) + len(SPM_CHARS))
    types += [5] * (len(tokens) - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [-1000.0 - i for i in range(len(SPM_CHARS))]
    scores += [-1e9] * (len(tokens) - len(scores))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)


def write_gguf(path: Path, model: Llama, arch: str = "llama", spm: bool = False) -> Path:
    cfg = model.config
    tok = make_tiny_tokenizer()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.d_head)
    if spm:
        add_spm_vocab(w, cfg.vocab_size)
    else:
        vocab = sorted(tok.backend.get_vocab().items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in vocab] + [f"<unused{i}>" for i in range(cfg.vocab_size - len(vocab))]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges([])
        w.add_bos_token_id(tok.bos_token_id or 0)
        w.add_eos_token_id(tok.eos_token_id or 0)
    w.add_chat_template(tok.chat_template or "")
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        arr = t.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            arr = permute(arr, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, cfg.n_kv_heads)
        parts = name.split(".")
        if parts[1] == "layers":  # model.layers.N.rest -> the "{i}" template of the name table
            gname = HF_TO_GGUF[".".join([*parts[:2], "{i}", *parts[3:]])].replace("{i}", parts[2])
        else:
            gname = HF_TO_GGUF[name]
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_import_round_trips_weights_and_logits(tmp_path: Path, tied: bool) -> None:
    model = tiny_model(seed=31, tie_word_embeddings=tied)
    out = import_gguf(write_gguf(tmp_path / "m.gguf", model), tmp_path / "hf", progress=False)
    loaded = load_model(out)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    tok = Tokenizer.from_dir(out)
    assert tok.encode("hello") == make_tiny_tokenizer().encode("hello")
    assert tok.chat_template == make_tiny_tokenizer().chat_template
    assert loaded.config.tie_word_embeddings is tied


SPM_TEXTS = ["hello world", "the world is here", "  two leading spaces", "Hello, World!", "and hell?",
             "unicode: \u00e9 \u00fc \u65e5\u672c", "line\nbreak\ttab", "x", "</s> after a special token"]


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    """A Llama 2 style file (tokenizer model 'llama': SentencePiece BPE, scores and no merges, byte fallback):
    ours tokenizes and decodes as transformers does when it loads the same GGUF."""
    import transformers

    path = write_gguf(tmp_path / "m.gguf", tiny_model(seed=3), spm=True)
    ours = Tokenizer.from_dir(import_gguf(path, tmp_path / "hf", progress=False))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    hello = ours.encode("hello world")
    assert hello[0] == 1 and len(hello) == 3  # <s>, then the merged pieces "\u2581hello" and "\u2581world"
    bytes_of = [3 + b for b in "\u65e5".encode()]  # not in the vocabulary: its UTF-8 bytes (<0xE6> is id 3 + 0xE6)
    assert ours.encode("\u65e5", add_special_tokens=False) == [ours.backend.token_to_id(S), *bytes_of]


def test_our_reader_reads_what_gguf_reads() -> None:
    """reader_class (GGUFReader on a plain view of the map, for speed) gives GGUFReader's fields and tensors, on
    the bundled model's file: a quantized one with a 49k-token vocabulary, merges and a chat template."""
    path = str(default_model_gguf())
    ours, theirs = reader_class()(path), gguf.GGUFReader(path)
    assert ours.fields.keys() == theirs.fields.keys()
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert (mine.types, mine.data, len(mine.parts)) == (field.types, field.data, len(field.parts)), key
        assert np.array_equal(np.asarray(mine.contents()), np.asarray(field.contents())), key
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.data_offset) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors, strict=True))


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tiny_model(), arch="mistral")
    with pytest.raises(ModelFormatError, match="'mistral' model; only the Llama architecture"):
        import_gguf(path, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tiny_model())
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ModelFormatError, match="not a readable GGUF file"):
        import_gguf(path, tmp_path / "hf", progress=False)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="does not exist"):
        import_gguf(tmp_path / "none.gguf", tmp_path / "hf", progress=False)
