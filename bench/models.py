"""Both sides of every comparison, built alike, and how their peak memory is read.

Ours is `unsloth_core.model.Llama` from a preset; HF's is transformers' `LlamaForCausalLM` (SDPA attention) from
the same config. Both get the same random weights: each parameter is drawn on the device from a generator seeded by
its name, and the names are identical, so neither side needs the other alive. LoRA is r=16, alpha=16, dropout 0 on
all seven projections; PEFT's A/B are copied from ours. In bf16 the frozen weights are bf16 and the LoRA matrices
fp32 under autocast, which is what our trainer and PEFT (`autocast_adapter_dtype`) both do.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from unsloth_core.config import LlamaConfig
from unsloth_core.lora import ALL_LINEAR, apply_lora, lora_layers, lora_parameters
from unsloth_core.model import Llama
from unsloth_core.quant import quantize_model

# Bench names (hf_baseline.py's) -> our presets. The HF side is built from our config, so both match exactly.
PRESETS = {"tiny": "tiny", "smollm2-135m": "smollm2-135m", "llama-1b": "llama-3.2-1b", "llama-8b": "llama-3.1-8b"}
LORA_R, LORA_ALPHA = 16, 16

LoRAInit = dict[str, tuple[Tensor, Tensor]]  # our LoRA layer name -> (A, B) on the host


def config(shape: str) -> LlamaConfig:
    return LlamaConfig.from_name(PRESETS[shape])


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02, prefix: str = "") -> None:
    """Norms at one, everything else normal(0, std), each from a generator seeded by the parameter's name (with
    `prefix`, the name of `model` inside the whole model, so a part gets what it would get in the whole)."""
    for name, p in model.named_parameters(prefix=prefix.rstrip(".")):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            p.normal_(0.0, std, generator=g)


def build_nf4(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Llama:
    """Our model with its block projections in NF4, built one block at a time (each drawn dense, then quantized),
    so the dense model never exists whole: what loading with `load_in_4bit` costs, not a 16-bit model's peak."""
    with torch.device("meta"), default_dtype(dtype):
        model = Llama(config(shape))
    parts: list[tuple[str, nn.Module]] = [("model.embed_tokens", model.model.embed_tokens)]
    parts += [(f"model.layers.{i}", block) for i, block in enumerate(model.model.layers)]
    parts += [("model.norm", model.model.norm)]
    if not model.config.tie_word_embeddings:
        parts.append(("lm_head", model.lm_head))
    for prefix, part in parts:
        part.to_empty(device=device)
        init_weights(part, seed, prefix=prefix)
        quantize_model(part)
    if model.config.tie_word_embeddings:  # to_empty gave the embedding a new Parameter: tie the head to it again
        model.lm_head.weight = model.model.embed_tokens.weight
    assert not any(t.is_meta for t in model.parameters()), "a part of the model was left unbuilt"
    model.init_buffers(device)
    return model


def build_ours(shape: str, device: torch.device, dtype: torch.dtype, lora: bool, seed: int = 0,
               nf4: bool = False) -> Llama:
    # Built straight in the compute dtype (an 8B model never exists in fp32); RoPE's inv_freq stays fp32.
    if nf4:
        model = build_nf4(shape, device, dtype, seed)
    else:
        with torch.device(device), default_dtype(dtype):
            model = Llama(config(shape))
        init_weights(model, seed)
    if lora:
        apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=ALL_LINEAR, seed=seed)
        for p in lora_parameters(model):
            p.data = p.data.float()  # trainable weights stay fp32, as the trainer keeps them
    return model


def lora_init(model: Llama) -> LoRAInit:
    # A copy: on the CPU `.cpu()` would alias the weights that training then updates in place.
    return {name: (m.lora_A.weight.detach().to("cpu", copy=True), m.lora_B.weight.detach().to("cpu", copy=True))
            for name, m in lora_layers(model)}


def build_hf(shape: str, device: torch.device, dtype: torch.dtype, lora: bool, gc: bool = False,
             init: LoRAInit | None = None, seed: int = 0) -> Any:
    """transformers' LlamaForCausalLM (+ PEFT LoRA), set up exactly as ../shared/bench/hf_baseline.py does."""
    import peft
    import transformers

    hf_config = transformers.LlamaConfig(**config(shape).to_hf_dict())
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    init_weights(model, seed)
    if gc:
        with warnings.catch_warnings():  # deprecated in 5.x in favour of a new name; hf_baseline.py's call
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not lora:
        return model
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=list(ALL_LINEAR)))
    with torch.no_grad():
        for name, (a, b) in (init or {}).items():
            layer: Any = model.get_submodule("base_model.model." + name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return model


def decode_weight_bytes(model: Llama) -> int:
    """Bytes a decode step must read: every weight once; an untied input embedding is only gathered from."""
    skip = set() if model.config.tie_word_embeddings else {id(model.model.embed_tokens.weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


# ---- memory ----


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch._dynamo.reset()  # a compiled decode step keeps its CUDA-graph memory pool alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks cached by offloading
        if host_empty is not None:
            host_empty()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next RSS reading starts clean


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory (GiB) of what runs inside the block.

    CUDA: `torch.cuda.max_memory_allocated` since entry (tensors already allocated count, as in hf_baseline.py).
    CPU: the rise of the process's peak RSS (VmHWM, reset at entry through /proc/self/clear_refs) over the RSS at
    entry: it counts what the block allocates and touches, seen through the allocator. None where unreadable.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gib: float | None = None
        self._base: int | None = None

    def __enter__(self) -> PeakMemory:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._base = _status_kib("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated() / 2**30
        elif self._base is not None:
            self.gib = (_status_kib("VmHWM") - self._base) / 2**20

    @staticmethod
    def kind(device: torch.device) -> str:
        return "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS rise (build + warm-up)"
