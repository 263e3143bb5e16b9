"""unsloth_core: the engine. Our Llama, LoRA, fused kernels, trainer, data formats, generation, checkpoints.

The public names below load on first use, so `import unsloth_core.data` (what the API process does to validate
uploads) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FastLanguageModel": "unsloth_core.facade",
    "is_bfloat16_supported": "unsloth_core.facade",
    "SFTConfig": "unsloth_core.sft_trainer",
    "SFTTrainer": "unsloth_core.sft_trainer",
    "GRPOConfig": "unsloth_core.rl.grpo_trainer",
    "GRPOTrainer": "unsloth_core.rl.grpo_trainer",
    "DataCollatorForSeq2Seq": "unsloth_core.collator",
    "TextStreamer": "unsloth_core.streamer",
    "get_chat_template": "unsloth_core.chat_templates",
    "standardize_sharegpt": "unsloth_core.sharegpt",
    "train_on_responses_only": "unsloth_core.response_only",
    "LlamaConfig": "unsloth_core.config",
    "Llama": "unsloth_core.model",
    "LoRAConfig": "unsloth_core.lora",
    "apply_lora": "unsloth_core.lora",
    "load_adapter": "unsloth_core.lora",
    "save_adapter": "unsloth_core.lora",
    "load_model": "unsloth_core.checkpoint",
    "save_model": "unsloth_core.checkpoint",
    "import_gguf": "unsloth_core.gguf_import",
    "Tokenizer": "unsloth_core.tokenizer",
    "Generator": "unsloth_core.generate",
    "SamplingParams": "unsloth_core.sampling",
    "TrainArgs": "unsloth_core.trainer",
    "Trainer": "unsloth_core.trainer",
    "finetune": "unsloth_core.finetune",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unsloth_core' has no attribute {name!r}")
