"""A tokenizer as llama.cpp's GGUF metadata (`tokenizer.ggml.*`): the inverse of what gguf_import.build_tokenizer
reads. Byte-level BPE ('gpt2': vocabulary, merges and the pre-tokenizer's llama.cpp name) and SentencePiece BPE
('llama': vocabulary, scores, token types); special token ids, whether a BOS / EOS is added, the chat template.

llama.cpp tokenizes SentencePiece vocabularies by scores, not merges: at each step it joins the adjacent pair whose
joined piece scores highest. A `tokenizer.json` keeps only the merge list, so each piece gets the score of the first
merge that makes it (earlier merges score higher), which tokenizes as the merge list does when the list came from
SentencePiece scores, as ours and transformers' conversions do. The export's read-back compares the tokenizations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from unsloth_core.errors import ModelFormatError
from unsloth_core.gguf_import import LLAMA3_SPLIT
from unsloth_core.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    """What `GGUFWriter` needs to write a tokenizer, all ids in the model's vocabulary."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    pre: str | None = None
    add_space_prefix: bool = True
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, padding, unknown
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The tokenizer's GGUF metadata for a model of `vocab_size` rows (ids past the tokenizer's are `[PAD<i>]`
    placeholders, as llama.cpp's converter writes them)."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelFormatError(f"a {model.get('type')!r} tokenizer cannot be written to GGUF: only BPE tokenizers "
                               f"(byte-level, as Llama 3 and SmolLM; SentencePiece, as Llama 2 and Mistral) can")
    tokens, types = _tokens(tokenizer, vocab_size)
    vocab = GGUFVocab("llama" if model.get("byte_fallback") else "gpt2", tokens, types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if vocab.model == "gpt2":
        vocab.merges, vocab.pre = merges, _pre_name(spec.get("pre_tokenizer"))
    else:
        vocab.scores = _scores(tokens, merges)
        vocab.add_space_prefix = _space_prefix(spec.get("pre_tokenizer"))
        vocab.types = [BYTE if _is_byte(t) and ty == NORMAL else ty for t, ty in zip(tokens, types)]
        unk = tokenizer.token_to_id(model.get("unk_token"))
        if unk is not None:
            vocab.types[unk] = UNKNOWN
    vocab.special_ids = _special_ids(tokenizer, model.get("unk_token"))
    vocab.add_bos, vocab.add_eos = adds_special_tokens(tokenizer)
    vocab.chat_template = tokenizer.chat_template
    return vocab


def _tokens(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise ModelFormatError(f"the tokenizer has ids up to {max(by_id)}, past the model's {vocab_size} rows")
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED)
    return tokens, types


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (the three our importer reads), else a clear refusal."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
            and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    raise ModelFormatError(f"this tokenizer's pre-tokenizer ({kinds}) has no llama.cpp equivalent we can name; "
                           f"a GGUF of it would tokenize differently in llama.cpp, so it is not written")


def _space_prefix(pre: dict[str, Any] | None) -> bool:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    meta = [s for s in steps if s.get("type") == "Metaspace"]
    return bool(meta) and meta[0].get("prepend_scheme", "always") != "never"


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first.setdefault(merge.replace(" ", "", 1), rank)
    return [-float(first[t]) if t in first else 0.0 for t in tokens]


def _is_byte(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _special_ids(tokenizer: Tokenizer, unk: str | None) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "padding": tokenizer.pad_token_id,
           "unknown": tokenizer.token_to_id(unk or tokenizer.unk_token)}
    # A second end id (Llama 3's <|eot_id|> beside <|end_of_text|>) is llama.cpp's end of turn.
    others = [i for i in tokenizer.eos_token_ids if i != tokenizer.eos_token_id]
    if others:
        ids["eot"] = others[0]
    return {k: v for k, v in ids.items() if v is not None}


def adds_special_tokens(tokenizer: Tokenizer) -> tuple[bool, bool]:
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (len(full) > len(plain) and full[0] == bos), (len(full) > len(plain) and full[-1] == eos)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the vocabulary's keys to a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for name, i in vocab.special_ids.items():
        getattr(writer, f"add_{'pad' if name == 'padding' else 'unk' if name == 'unknown' else name}_token_id")(i)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
