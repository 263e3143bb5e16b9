"""A `Judge` that runs its models in this process: the training worker's judge for score_model and label_model
rewards, with no HTTP server between GRPO and the judge.

    judge = LocalJudge(lambda name: JudgeModel(base_dir, adapter_dir))    # the caller maps names to files
    results = grade_batch(grader, completions, rows, judge=judge)

Each request's messages are rendered with the model's chat template, and every request of a batch for one model
decodes in one batched generation (the engine's `Generator`). A request whose `response_format` carries a JSON
schema (the model graders always send one) is held to it by constrained decoding, so even a small judge answers
JSON that `model_grader` reads; a schema the grammar engine cannot hold decodes free, and the grader reads the
plain answer. `reasoning_effort` is ignored: it sets the thinking budget of OpenAI's reasoning models, and the open
chat models loaded here have no such setting (a template's own switch, such as `enable_thinking`, is a different
one, and turning it on would only make the answer longer).
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unsloth_core.checkpoint import load_model, parse_dtype
from unsloth_core.constrained import Constraint, GrammarError, check
from unsloth_core.errors import ContextLengthError, ModelFormatError, UnslothError
from unsloth_core.facade import auto_dtype
from unsloth_core.generate import Generator
from unsloth_core.graders.judge import JudgeRequest
from unsloth_core.lora import load_adapter
from unsloth_core.memory import release_memory
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.tokenizer import Tokenizer

# New tokens per answer when the grader's sampling_params set no max_completions_tokens: room for OpenAI's
# {"steps": [...], "result": ...} with a few steps, and a bound on a judge that never closes its JSON.
DEFAULT_MAX_TOKENS = 1024


@dataclass(frozen=True)
class JudgeModel:
    """Where a judge model's files are: a base model directory, and for a fine-tune or a checkpoint the LoRA
    adapter directory on it (None: the base alone)."""

    base: Path
    adapter: Path | None = None

    def __post_init__(self) -> None:  # paths given as strings name the same model (and cache key) as Paths
        object.__setattr__(self, "base", Path(self.base))
        if self.adapter is not None:
            object.__setattr__(self, "adapter", Path(self.adapter))


class UnknownJudgeModelError(UnslothError, LookupError):
    """A grader names a model the caller's `resolve` does not know."""


@dataclass
class _Loaded:
    base: Llama  # the base's weights, shared with every adapter loaded on them
    generator: Generator
    tokenizer: Tokenizer
    eos_ids: list[int]
    constraints: dict[str, Constraint | None] = field(default_factory=dict)  # response_format (JSON) -> checked


class LocalJudge:
    """Runs judge requests on models loaded in this process, the last `max_loaded` of them kept loaded.

    Args:
        resolve: a model name (a base model, a fine-tune, a checkpoint) -> where its files are; KeyError or
            ValueError for a name it does not know, which fails the batch with an `UnknownJudgeModelError` naming
            it (`grade_batch` scores those samples 0 with `model_grader_server_error`).
        device: where the models run (default: the GPU when there is one).
        dtype: their weights' dtype (default: bf16, or fp16 on GPUs without it; fp32 on a CPU).
        max_loaded: models kept loaded between calls, least recently used dropped first. An adapter loaded on a
            base that is loaded shares its weights.
        max_tokens: new tokens per answer when the request sets no `max_completions_tokens`.

    Calls are serialized (one generation at a time on these models); a call for a model not loaded loads it.
    """

    def __init__(self, resolve: Callable[[str], JudgeModel], device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_loaded: int = 1,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.resolve = resolve
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = parse_dtype(dtype) or auto_dtype(self.device)
        self.max_loaded, self.max_tokens = max_loaded, max_tokens
        self._loaded: OrderedDict[JudgeModel, _Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, requests: Sequence[JudgeRequest], /) -> list[str]:
        """One answer per request, in order: each model's requests generated in one batch."""
        rows: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            rows.setdefault(request.model, []).append(i)
        where = {name: self._where(name) for name in rows}  # every name known before anything loads or runs
        texts = [""] * len(requests)
        with self._lock:
            for name, indices in rows.items():
                loaded = self._load(name, where[name])
                for i, text in zip(indices, self._generate(loaded, [requests[i] for i in indices])):
                    texts[i] = text
        return texts

    def loaded(self) -> list[JudgeModel]:
        """The models loaded now, least recently used first."""
        return list(self._loaded)

    def close(self) -> None:
        """Unload every model and give their memory back."""
        with self._lock:
            while self._loaded:
                self._unload(next(iter(self._loaded)))

    # ---- models ----

    def _where(self, name: str) -> JudgeModel:
        try:
            return self.resolve(name)
        except (KeyError, ValueError) as e:
            detail = str(e.args[0]) if e.args else ""
            reason = f": {detail}" if detail and detail != name else ""
            raise UnknownJudgeModelError(f"the judge model {name!r} is not one this process can run{reason}"
                                         ) from None

    def _load(self, name: str, where: JudgeModel) -> _Loaded:
        found = self._loaded.get(where)
        if found is not None:
            self._loaded.move_to_end(where)
            return found
        base = next((m.base for key, m in self._loaded.items() if key.base == where.base), None)
        while len(self._loaded) >= self.max_loaded:  # make room first: a GPU may hold only one judge beside training
            self._unload(next(iter(self._loaded)))
        try:
            if base is None:
                base = load_model(where.base, self.device, self.dtype)
            model = base if where.adapter is None else load_adapter(base, where.adapter)
            tokenizer = _tokenizer(where)
        except (UnslothError, OSError) as e:
            raise ModelFormatError(f"the judge model {name!r} cannot be loaded: {e}") from e
        generator = Generator(model, tokenizer)
        eos_ids = sorted(generator.engine.eos | set(tokenizer.eos_token_ids))
        loaded = self._loaded[where] = _Loaded(base, generator, tokenizer, eos_ids)
        return loaded

    def _unload(self, key: JudgeModel) -> None:
        self._loaded.pop(key).generator.engine.close()  # frees its KV cache
        release_memory()

    # ---- generation ----

    def _generate(self, loaded: _Loaded, requests: list[JudgeRequest]) -> list[str]:
        prompts = [loaded.tokenizer.apply_chat_template(list(r.messages), add_generation_prompt=True)
                   for r in requests]
        params = [self._params(loaded, r, len(p)) for r, p in zip(requests, prompts)]
        return [c.text for c in loaded.generator.generate(prompts, params)]

    def _params(self, loaded: _Loaded, request: JudgeRequest, n_prompt: int) -> SamplingParams:
        """OpenAI's sampling knobs (its defaults where unset: temperature 1, top_p 1) and a token limit that fits
        the context."""
        given = request.sampling_params
        context = loaded.generator.max_seq_length
        if n_prompt >= context:
            raise ContextLengthError(f"a prompt for the judge model {request.model!r} is {n_prompt} tokens, and its "
                                     f"context holds {context}: shorten the grader's input")
        wanted = _value(given, "max_completions_tokens", self.max_tokens)
        return SamplingParams(max_new_tokens=min(wanted, context - n_prompt),
                              temperature=_value(given, "temperature", 1.0), top_p=_value(given, "top_p", 1.0),
                              seed=_value(given, "seed", None),
                              constraint=self._constraint(loaded, request.response_format))

    def _constraint(self, loaded: _Loaded, response_format: Mapping[str, Any]) -> Constraint | None:
        """The grammar `response_format` asks for, checked once per model and format; None when there is none or
        the grammar engine cannot hold it (the judge then answers free)."""
        if not response_format:
            return None
        key = json.dumps(response_format, sort_keys=True)
        if key not in loaded.constraints:
            loaded.constraints[key] = _checked(_constraint_of(response_format), loaded)
        return loaded.constraints[key]


def _value(params: Mapping[str, Any], key: str, default: Any) -> Any:
    value = params.get(key)
    return default if value is None else value


def _constraint_of(response_format: Mapping[str, Any]) -> Constraint | None:
    kind = response_format.get("type")
    if kind == "json_object":
        return Constraint.json_object()
    spec = response_format.get("json_schema")
    if kind != "json_schema" or not isinstance(spec, Mapping):
        return None
    schema = spec.get("schema")
    return Constraint.json_schema(schema if isinstance(schema, dict | bool) else {})


def _checked(constraint: Constraint | None, loaded: _Loaded) -> Constraint | None:
    if constraint is None:
        return None
    try:
        check(constraint, loaded.tokenizer, loaded.eos_ids)
    except GrammarError as e:
        warnings.warn(f"the judge's response_format cannot constrain decoding ({e}); it answers unconstrained",
                      RuntimeWarning, stacklevel=2)
        return None
    return constraint


def _tokenizer(where: JudgeModel) -> Tokenizer:
    """The tokenizer the model was trained with: an adapter's own files when saved beside it, else the base's; a
    chat template saved with the adapter wins over the base's (as the server loads a fine-tune)."""
    if where.adapter is not None and (where.adapter / "tokenizer.json").is_file():
        return Tokenizer.from_dir(where.adapter)
    base = Tokenizer.from_dir(where.base)
    template = where.adapter / "chat_template.jinja" if where.adapter is not None else None
    if template is not None and template.is_file():
        return Tokenizer(base.backend, base.config, template.read_text(), base.eos_token_ids)
    return base
