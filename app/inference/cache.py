"""Loaded models for serving: each base model once (LRU), each fine-tune or checkpoint as its adapter applied on a
shared base (LRU), each with its tokenizer and a `Generator`. torch and the engine are imported on first use only,
so an API process that never serves a completion never loads them."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.config import Settings
from app.services.models import Servable

if TYPE_CHECKING:
    from unsloth_core.model import Llama
    from unsloth_core.serving import BatchEngine
    from unsloth_core.tokenizer import Tokenizer

log = logging.getLogger("app.inference")


@dataclass
class Served:
    """One servable model. Its `engine` batches every request for it into one decode loop (thread-safe)."""

    id: str
    kind: str
    base_id: str
    engine: BatchEngine
    tokenizer: Tokenizer

    @property
    def max_len(self) -> int:
        return int(self.engine.max_seq_length)


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(setting: str, device: str) -> str | None:
    if setting != "auto":
        return setting
    return "bfloat16" if device.startswith("cuda") else "float32"


class ModelCache:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._device: str | None = None
        self._lock = threading.Lock()  # guards the dicts
        self._load_lock = threading.Lock()  # one load at a time (loads are rare, memory is not)
        self._bases: OrderedDict[str, tuple[Llama, Tokenizer]] = OrderedDict()
        self._served: OrderedDict[tuple[str, str], Served] = OrderedDict()

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = resolve_device(self.settings.device)
        return self._device

    def get(self, servable: Servable) -> Served:
        """The loaded model for `servable`, loading its base and adapter when needed (blocking: call off the loop)."""
        key = (servable.id, str(servable.adapter_path or servable.base_path))
        with self._lock:
            served = self._served.get(key)
            if served is not None:
                self._served.move_to_end(key)
                self._bases.move_to_end(served.base_id)
                return served
        with self._load_lock:
            with self._lock:
                if key in self._served:
                    return self._served[key]
            served = self._load(servable)
            with self._lock:
                self._served[key] = served
                self._evict()
            return served

    def evict(self, model_ids: list[str]) -> None:
        with self._lock:
            for key in [k for k in self._served if k[0] in model_ids]:
                self._served.pop(key).engine.retire()

    def peek(self, model_id: str) -> Served | None:
        """The loaded model with this id, if any (no loading, no LRU update)."""
        with self._lock:
            return next((s for k, s in self._served.items() if k[0] == model_id), None)

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._served]

    # ---- loading ----

    def _load(self, servable: Servable) -> Served:
        from unsloth_core.serving import BatchEngine

        base, base_tokenizer = self._base(servable.base_id, servable.base_path)
        model, tokenizer = base, base_tokenizer
        if servable.adapter_path is not None:
            from unsloth_core.lora import load_adapter

            log.info("loading adapter %s", servable.id)
            # A new model object sharing the base's weights: its own adapter and its own KV cache.
            model = load_adapter(base, servable.adapter_path)
            tokenizer = self._adapter_tokenizer(servable.adapter_path, base_tokenizer)
        engine = BatchEngine(model, tokenizer, max_batch_size=self.settings.max_batch_size)
        return Served(servable.id, servable.kind, servable.base_id, engine, tokenizer)

    def _base(self, base_id: str, path: Path) -> tuple[Llama, Tokenizer]:
        with self._lock:
            if base_id in self._bases:
                self._bases.move_to_end(base_id)
                return self._bases[base_id]
        from unsloth_core.checkpoint import load_model
        from unsloth_core.tokenizer import Tokenizer

        with self._lock:  # make room first: at the limit, loading before evicting would hold one base too many
            while self._bases and len(self._bases) >= self.settings.max_loaded_base_models:
                self._drop_base(next(iter(self._bases)))
        log.info("loading base model %s on %s", base_id, self.device)
        model = load_model(path, self.device, resolve_dtype(self.settings.dtype, self.device))
        loaded = (model, Tokenizer.from_dir(path))
        with self._lock:
            self._bases[base_id] = loaded
        return loaded

    @staticmethod
    def _adapter_tokenizer(adapter: Path, base: Tokenizer) -> Tokenizer:
        """The tokenizer the adapter was trained with: its own files when saved beside it, else the base's; a chat
        template saved with the adapter wins over the base's."""
        from unsloth_core.tokenizer import Tokenizer

        if (adapter / "tokenizer.json").is_file():
            return Tokenizer.from_dir(adapter)
        template = adapter / "chat_template.jinja"
        if template.is_file():
            return Tokenizer(base.backend, base.config, template.read_text(), base.eos_token_ids)
        return base

    def _evict(self) -> None:
        """Drop least-recently-used adapters, then bases (with everything served on them), beyond the limits."""
        adapters = [k for k, s in self._served.items() if s.kind != "base"]
        for key in adapters[: max(0, len(adapters) - self.settings.max_loaded_adapters)]:
            self._served.pop(key).engine.retire()  # its running streams finish first
        while len(self._bases) > self.settings.max_loaded_base_models:
            self._drop_base(next(iter(self._bases)))

    def _drop_base(self, base_id: str) -> None:
        """Unload a base and everything served on it (their running streams finish first). Caller holds the lock."""
        del self._bases[base_id]
        for key in [k for k, s in self._served.items() if s.base_id == base_id]:
            self._served.pop(key).engine.retire()
        log.info("unloaded base model %s", base_id)

