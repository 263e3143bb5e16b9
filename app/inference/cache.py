"""Loaded models for serving: each base model once (LRU) with one `BatchEngine` and one `AdapterPool`; each
fine-tune or checkpoint an adapter in its base's pool (LRU), so requests for the base and for every fine-tune of it
decode in one batch. An adapter that also trains the embeddings or the head (`modules_to_save`) cannot share the
base's weights in a batch: it gets a model (sharing the base's frozen weights) and an engine of its own. torch and
the engine are imported on first use only, so an API process that never serves a completion never loads them."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.config import Settings
from app.core.errors import APIError
from app.services.models import Servable

if TYPE_CHECKING:
    from unsloth_core.adapters import AdapterPool
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
    engine: BatchEngine  # the base's, shared, for a pooled adapter
    tokenizer: Tokenizer
    adapter: str | None = None  # its name in the engine's AdapterPool; None: the engine's own model

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
        self._bases: OrderedDict[str, _Base] = OrderedDict()
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
                self._unload(self._served.pop(key))

    def peek(self, model_id: str) -> Served | None:
        """The loaded model with this id, if any (no loading, no LRU update)."""
        with self._lock:
            return next((s for k, s in self._served.items() if k[0] == model_id), None)

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._served]

    # ---- loading ----

    def _load(self, servable: Servable) -> Served:
        base = self._base(servable.base_id, servable.base_path)
        if servable.adapter_path is None:
            return Served(servable.id, servable.kind, servable.base_id, base.engine, base.tokenizer)
        from unsloth_core.checkpoint import is_complete

        try:
            return self._load_adapter(servable, servable.adapter_path, base)
        except Exception:  # whichever file it was reading went first (a missing file's error differs by reader)
            # Its row was found, then its files went: a checkpoint pruned (or a model deleted) meanwhile. Gone, as
            # for a request that came a moment later; a load that fails on files all there is the server's error.
            if is_complete(servable.adapter_path):
                raise
            log.warning("model %s: its files went while it was being loaded (pruned or deleted)", servable.id)
            raise APIError(404, f"The model '{servable.id}' does not exist: it was deleted (a checkpoint pruned) "
                                "while this request was loading it.", param="model", code="model_not_found") from None

    def _load_adapter(self, servable: Servable, path: Path, base: _Base) -> Served:
        from unsloth_core.lora import load_adapter, read_adapter_config
        from unsloth_core.serving import BatchEngine

        tokenizer = self._adapter_tokenizer(path, base.tokenizer)
        if not read_adapter_config(path).modules_to_save:
            log.info("loading adapter %s into the pool of %s", servable.id, servable.base_id)
            base.pool.load(servable.id, path)
            return Served(servable.id, servable.kind, servable.base_id, base.engine, tokenizer, adapter=servable.id)
        log.info("loading adapter %s with its own embeddings or head", servable.id)
        model = load_adapter(base.model, path)  # shares the base's frozen weights
        engine = BatchEngine(model, tokenizer, max_batch_size=self.settings.max_batch_size,
                             compile=self._compile_decode)
        return Served(servable.id, servable.kind, servable.base_id, engine, tokenizer)

    def _base(self, base_id: str, path: Path) -> _Base:
        with self._lock:
            if base_id in self._bases:
                self._bases.move_to_end(base_id)
                return self._bases[base_id]
        from unsloth_core.adapters import AdapterPool
        from unsloth_core.checkpoint import load_model
        from unsloth_core.serving import BatchEngine
        from unsloth_core.tokenizer import Tokenizer

        with self._lock:  # make room first: at the limit, loading before evicting would hold one base too many
            while self._bases and len(self._bases) >= self.settings.max_loaded_base_models:
                self._drop_base(next(iter(self._bases)))
        log.info("loading base model %s on %s", base_id, self.device)
        model = load_model(path, self.device, resolve_dtype(self.settings.dtype, self.device))
        tokenizer = Tokenizer.from_dir(path)
        pool = AdapterPool(model, capacity=self.settings.max_loaded_adapters)
        engine = BatchEngine(model, tokenizer, max_batch_size=self.settings.max_batch_size, adapters=pool,
                             compile=self._compile_decode)
        loaded = _Base(model, tokenizer, pool, engine)
        with self._lock:
            self._bases[base_id] = loaded
        return loaded

    @property
    def _compile_decode(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.settings.compile_decode]

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
            self._unload(self._served.pop(key))
        while len(self._bases) > self.settings.max_loaded_base_models:
            self._drop_base(next(iter(self._bases)))

    def _drop_base(self, base_id: str) -> None:
        """Unload a base and everything served on it (their running streams finish first). Caller holds the lock."""
        base = self._bases.pop(base_id)
        for key in [k for k, s in self._served.items() if s.base_id == base_id]:
            self._unload(self._served.pop(key))
        base.engine.retire()  # its running streams (adapters' too) finish first
        log.info("unloaded base model %s", base_id)

    def _unload(self, served: Served) -> None:
        """Let a served model go. A pooled adapter leaves its base's pool (or, while requests use it, stays until
        its slot is reused); a base's engine retires with the base; an adapter with its own engine retires it."""
        if served.adapter is not None:
            assert served.engine.adapters is not None  # a pooled adapter is served by its base's pooled engine
            served.engine.adapters.remove(served.adapter)
        elif served.kind != "base":
            served.engine.retire()  # its running streams finish first


@dataclass
class _Base:
    """A loaded base model: its one engine decodes its own requests and its pooled adapters' together."""

    model: Llama
    tokenizer: Tokenizer
    pool: AdapterPool
    engine: BatchEngine

