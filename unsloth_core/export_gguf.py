"""GGUF export: our Llama, with any LoRA adapter merged, as one llama.cpp file (weights, config, tokenizer, chat
template), checked by reading it back before it is handed over (export_verify.py).

The `gguf` package writes the file and quantizes; what is ours is the mapping, the inverse of gguf_import.py:
HF tensor names to llama.cpp's, the Q/K row permutation for llama.cpp's interleaved RoPE, llama3 RoPE scaling as
the per-frequency `rope_freqs` divisors, and the config as `llama.*` keys (context length included), so llama.cpp,
Ollama and LM Studio need nothing else.

Quantization types: the ones the installed `gguf` package (0.19) can quantize to that llama.cpp runs for a dense
Llama: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0. It cannot write K-quants or i-quants (q4_k_m, q6_k, iq4_xs:
llama.cpp's `llama-quantize` makes those from our f16 file); it also writes tq1_0 / tq2_0 (ternary, for models
trained with ternary weights) and mxfp4 (llama.cpp keeps it for mixture-of-experts weights), which a Llama
fine-tune cannot use, so they are refused. As llama.cpp's converter does, norms stay f32, and a matrix whose rows
do not split into the type's blocks falls back to f16; below 8 bits the output head is kept at q8_0 (llama.cpp's
`llama-quantize` keeps it at 6 bits or more: it matters most for the next token; a tied embedding is
the head).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unsloth_core.checkpoint import model_state_dict
from unsloth_core.config import LlamaConfig
from unsloth_core.export_cancel import StopCheck, check_stop
from unsloth_core.export_gguf_tokenizer import gguf_vocab, write_vocab
from unsloth_core.gguf_import import TENSOR_NAMES
from unsloth_core.model import Llama, rope_inv_freq
from unsloth_core.tokenizer import Tokenizer

QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# Unsloth's names for the common choices; "quantized" (q4_k_m) needs llama-quantize and is refused with the list.
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "f64": "f32"}
REFUSED = {
    "tq1_0": "a ternary type for models trained with ternary weights", "tq2_0": "a ternary type for models trained "
    "with ternary weights", "mxfp4": "llama.cpp uses it for mixture-of-experts weights only",
}
HF_TO_GGUF = {hf: g for g, hf in TENSOR_NAMES.items()}


def quantization_type(name: str) -> str:
    """The canonical name of a quantization method, or a ValueError listing the valid ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in QUANTIZATIONS:
        return key
    why = REFUSED.get(key) or ("a K-quant / i-quant, which the gguf package cannot write: make it from the f16 "
                               "file with llama.cpp's llama-quantize" if key in {"quantized"} or "_k" in key
                               or key.startswith("iq") else "not a GGUF type")
    raise ValueError(f"quantization_method {name!r} is not supported ({why}); use one of "
                     f"{', '.join(QUANTIZATIONS)} (or {', '.join(ALIASES)})")


def merged_copy(model: Llama, should_stop: StopCheck | None = None) -> Llama:
    """The model with every adapter folded in, in fp32, on the CPU: a QLoRA base is dequantized to 16 bits first,
    then the adapter added (lora.py's merge), so nothing is rounded to 4 bits twice. The model itself is unchanged.
    `should_stop` is asked before each block's merge (export_cancel.py)."""
    from unsloth_core.lora import strip_lora

    merging = functools.partial(check_stop, should_stop, "merging the adapter")
    merging()
    state = model_state_dict(strip_lora(copy.deepcopy(model), merging) if model.lora_config is not None else model)
    config = dataclasses.replace(model.config, torch_dtype="float32")
    with torch.device("meta"):
        merged = Llama(config)
    merged.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        merged.lm_head.weight = merged.model.embed_tokens.weight
    merged.init_buffers("cpu")
    return merged.eval()


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if parts[1] == "layers":
        return HF_TO_GGUF[".".join([*parts[:2], "{i}", *parts[3:]])].replace("{i}", parts[2])
    return HF_TO_GGUF[hf]


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's half-split rows of each Q/K head into llama.cpp's interleaved pairs (gguf_import.unpermute_rope's
    inverse)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(name: str, shape: tuple[int, ...], quantization: str, tied: bool = False) -> str:
    """The type one tensor is stored in, by the rules in the module docstring (a tied embedding is the head)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1 or quantization == "f32":
        return "f32"
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    if quantization in ("q5_1", "q5_0", "q4_1", "q4_0") and head:
        quantization = "q8_0"
    block = GGML_QUANT_SIZES[GGMLQuantizationType[quantization.upper()]][0]
    return quantization if shape[-1] % block == 0 else "f16"


def encode_tensor(w: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """The array GGUFWriter stores and its raw type (None: the numpy dtype says it)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if kind == "f32":
        return w.astype(np.float32), None
    if kind == "f16":
        return w.astype(np.float16), None
    qtype = GGMLQuantizationType[kind.upper()]
    return quantize(w.astype(np.float32), qtype), qtype


def write_gguf(model: Llama, tokenizer: Tokenizer, path: str | os.PathLike[str], quantization: str,
               name: str | None = None, should_stop: StopCheck | None = None) -> Path:
    """Write an fp32 (merged, adapter-free) `model` and its tokenizer as a GGUF file of `quantization`;
    `should_stop` is asked before each tensor is encoded (export_cancel.py; the caller removes the file)."""
    import gguf

    config, path = model.config, Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    write_config(writer, config, name or str(config.extra.get("_name_or_path") or path.stem), quantization)
    write_vocab(writer, gguf_vocab(tokenizer, config.vocab_size))
    for hf, t in model_state_dict(model).items():
        check_stop(should_stop, "writing the GGUF file")
        w = t.detach().float().cpu().numpy()
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_rope(w, config.num_attention_heads if "q_proj" in hf else config.n_kv_heads)
        data, raw = encode_tensor(w, tensor_type(gguf_name(hf), w.shape, quantization,
                                                 config.tie_word_embeddings))
        writer.add_tensor(gguf_name(hf), data, raw_dtype=raw)
    if config.rope_scaling is not None:  # llama3: the divisors of each frequency, as llama.cpp reads them
        base = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
        writer.add_tensor("rope_freqs.weight", (base / rope_inv_freq(config)).numpy().astype(np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def write_config(writer: Any, config: LlamaConfig, name: str, quantization: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.d_head)
    writer.add_key_length(config.d_head)
    writer.add_value_length(config.d_head)
    writer.add_vocab_size(config.vocab_size)
    file_type = "ALL_F32" if quantization == "f32" else f"MOSTLY_{quantization.upper()}"
    writer.add_file_type(gguf.LlamaFileType[file_type])
