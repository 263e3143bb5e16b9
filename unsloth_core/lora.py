"""LoRA: a drop-in `nn.Linear` with a low-rank update, injected by one function, saved in PEFT's format.

`LoRALinear` *is* an `nn.Linear` (same `weight`/`bias` names), so base checkpoints load unchanged, and adds
`lora_A` (r, in) and `lora_B` (out, r) submodules: PEFT's key names minus its adapter-name level, which PEFT itself
strips when it saves. y = x W^T + b + scaling * (dropout(x) A^T) B^T, with scaling = alpha / r (alpha / sqrt(r) with
rsLoRA), exactly as PEFT computes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unsloth_core.checkpoint import atomic_directory
from unsloth_core.config import PROJECTIONS
from unsloth_core.errors import ModelFormatError
from unsloth_core.model import AdapterLinear, Llama
from unsloth_core.quant import dense, is_quantized, quantize_model
from unsloth_core.quant import linear as base_linear

ALL_LINEAR = PROJECTIONS
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """The subset of PEFT's `LoraConfig` we honour; written to and read from adapter_config.json."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    use_rslora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    modules_to_save: list[str] | None = None
    bias: Literal["none"] = "none"
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ValueError("only bias='none' is supported (biases of the base layers stay frozen)")
        if isinstance(self.target_modules, str):
            self.target_modules = list(ALL_LINEAR) if self.target_modules == "all-linear" else [self.target_modules]
        unknown = set(self.target_modules) - set(ALL_LINEAR)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}; choose from {', '.join(ALL_LINEAR)}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(peft_type="LORA", task_type="CAUSAL_LM", fan_in_fan_out=False, inference_mode=True, use_dora=False,
                 layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={}, revision=None)
        return d

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> LoRAConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise ModelFormatError(f"adapter type {d.get('peft_type')!r} is not LoRA")
        for unsupported in ("use_dora", "fan_in_fan_out"):
            if d.get(unsupported):
                raise ModelFormatError(f"adapter option {unsupported}=true is not supported")
        if d.get("rank_pattern") or d.get("alpha_pattern") or d.get("layers_to_transform"):
            raise ModelFormatError("adapters with per-layer ranks, alphas or layer subsets are not supported")
        keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "modules_to_save", "bias",
                "base_model_name_or_path", "init_lora_weights")
        return cls(**{k: d[k] for k in keys if k in d and d[k] is not None})


class LoRALinear(AdapterLinear):
    """`nn.Linear` plus a trainable low-rank update; a drop-in replacement that keeps `weight` and `bias`."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False, use_rslora: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.scaling = r, alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.dropout_p = dropout
        self.disabled = False  # DPO's reference pass and "base model" serving
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> LoRALinear:
        """Wrap an existing layer, sharing (not copying) its weight and bias."""
        w = linear.weight
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, config.r, config.lora_alpha, config.lora_dropout,
                      bias=linear.bias is not None, use_rslora=config.use_rslora)
        new.weight, new.bias = linear.weight, linear.bias
        # Adapters in fp32 whatever the base's dtype, as PEFT keeps them (`autocast_adapter_dtype`): the optimizer
        # updates fp32 values, so small steps are not rounded away as they would be in bf16.
        new.lora_A.weight = nn.Parameter(torch.empty(config.r, linear.in_features, device=w.device))
        new.lora_B.weight = nn.Parameter(torch.empty(linear.out_features, config.r, device=w.device))
        new.reset_lora(config.init_lora_weights)
        return new

    def reset_lora(self, init: bool | str = True, generator: torch.Generator | None = None) -> None:
        """PEFT's initialisations: A kaiming-uniform (or gaussian 1/r), B zero, so training starts at the base."""
        with torch.no_grad():
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            if init == "gaussian":
                a.normal_(0.0, 1.0 / self.r, generator=generator)
            else:
                bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) reduces to this bound
                a.uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def fusable_parts(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor] | None:
        if self.disabled or self.merged:
            return None
        return self.weight, self.bias, self.lora_A.weight, self.lora_B.weight

    def adapter_hparams(self) -> tuple[float, float]:
        return float(self.scaling), float(self.dropout_p)

    def lora_delta(self) -> Tensor:
        """scaling * B @ A in fp32: what merging adds to the weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: Tensor) -> Tensor:
        y = base_linear(x, self.weight, self.bias)  # a 4-bit base weight is dequantized for the product only
        if self.disabled or self.merged:
            return y
        lora_in = F.dropout(x, self.dropout_p, self.training) if self.dropout_p else x
        if not torch.is_autocast_enabled(x.device.type):  # a 16-bit x meets the fp32 adapter: compute in fp32
            lora_in = lora_in.to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(lora_in)) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight. A 4-bit base is dequantized first: the merged layer is 16-bit (NF4
        cannot hold W + BA without rounding away most of the update), as Unsloth's merged_16bit export does."""
        if not self.merged:
            if is_quantized(self.weight):
                self.weight = nn.Parameter(dense(self.weight), requires_grad=False)
            self.weight.copy_((self.weight.float() + self.lora_delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.lora_delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, dropout={self.dropout_p}"


# ---- injection and trainable parameters ----


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def apply_lora(model: Llama, r: int = 16, alpha: float = 16, dropout: float = 0.0,
               target_modules: Sequence[str] = ALL_LINEAR, use_rslora: bool = False,
               init: bool | Literal["gaussian"] = True, modules_to_save: Sequence[str] | None = None,
               seed: int | None = None) -> Llama:
    """Swap the targeted `nn.Linear`s of `model` for `LoRALinear`s (in place) and freeze everything else."""
    config = LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        use_rslora=use_rslora, init_lora_weights=init,
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    return inject(model, config, seed)


def inject(model: Llama, config: LoRAConfig, seed: int | None = None) -> Llama:
    if model.lora_config is not None:
        raise ValueError("this model already has LoRA adapters")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for block in model.blocks():
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in config.target_modules and isinstance(child, nn.Linear):
                    layer = LoRALinear.from_linear(child, config)
                    layer.reset_lora(config.init_lora_weights, generator)
                    setattr(parent, name, layer)
    model.lora_config = config
    set_trainable(model, config.modules_to_save)
    return model


def set_trainable(model: Llama, modules_to_save: Sequence[str] | None = None) -> None:
    """Only LoRA matrices (and whole modules named in modules_to_save, e.g. embed_tokens / lm_head) train."""
    saved = set(modules_to_save or ())
    unknown = saved - {"embed_tokens", "lm_head"}
    if unknown:
        raise ValueError(f"modules_to_save supports embed_tokens and lm_head, not {sorted(unknown)}")
    # With tied embeddings one tensor has two names; it trains if either name is listed.
    trainable = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if is_adapter_param(n, saved)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def is_adapter_param(name: str, modules_to_save: set[str]) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts or (len(parts) > 1 and parts[-2] in modules_to_save)


def adapter_state_dict(model: Llama) -> dict[str, Tensor]:
    """Adapter tensors under our names (LoRA matrices plus modules_to_save weights)."""
    config: LoRAConfig = model.lora_config
    saved = set(config.modules_to_save or ())
    return {n: p for n, p in model.named_parameters(remove_duplicate=False) if is_adapter_param(n, saved)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model (DPO's reference pass). LoRA layers only: modules_to_save keep their trained weights."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


@contextlib.contextmanager
def reference_policy(model: nn.Module) -> Iterator[None]:
    """Run the policy that DPO's and GRPO's KL terms compare against: the base with the adapters off, or, for a
    model whose training continued an earlier fine-tune (`model.reference_adapter`, set by `finetune`), that
    fine-tune: its adapter tensors swapped in for the pass (no second model), the trained ones put back after."""
    start: dict[str, Tensor] | None = getattr(model, "reference_adapter", None)
    if start is None:
        with disable_adapters(model):
            yield
        return
    current = adapter_state_dict(model)  # type: ignore[arg-type]
    kept = {n: p.data for n, p in current.items()}
    for n, p in current.items():
        if start[n].dtype != p.dtype or start[n].device != p.device:  # the trainer cast its masters since
            start[n] = start[n].to(device=p.device, dtype=p.dtype)
    try:
        for n, p in current.items():
            p.data = start[n]
        yield
    finally:
        for n, p in current.items():
            p.data = kept[n]


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


def strip_lora(model: Llama, between: Callable[[], object] | None = None) -> Llama:
    """Merge every adapter and put plain `nn.Linear`s back: a model with no trace of LoRA (for export).
    `between` is called before each block is merged (an export's cancel check)."""
    for block in model.blocks():
        if between is not None:
            between()
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    child.merge()
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device="meta")
                    plain.weight, plain.bias = child.weight, child.bias
                    setattr(parent, name, plain)
    model.lora_config = None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---- PEFT-format adapter files ----


def peft_key(name: str) -> str:
    """Our parameter name -> PEFT's saved key (`model.layers.0...lora_A.weight` -> `base_model.model.model...`)."""
    return PEFT_PREFIX + name


def our_key(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise ModelFormatError(f"unexpected adapter tensor {key!r} (PEFT keys start with {PEFT_PREFIX!r})")
    key = key[len(PEFT_PREFIX):]
    # PEFT saves modules_to_save copies as `<module>.modules_to_save.<adapter>.weight` in some versions.
    return key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")


def save_adapter(model: Llama, directory: str | os.PathLike[str], base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format), atomically."""
    with atomic_directory(directory) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path)
    return Path(directory)


def write_adapter_files(model: Llama, directory: Path, base_model_name_or_path: str | None = None) -> None:
    """The two PEFT files, written into an existing directory (the caller makes the write atomic)."""
    config: LoRAConfig | None = model.lora_config
    if config is None:
        raise ValueError("this model has no LoRA adapters to save (call apply_lora / get_peft_model first)")
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    tensors: dict[str, Tensor] = {}
    for k, v in adapter_state_dict(model).items():
        t = v.detach().contiguous().cpu()
        # A tied embedding and head both saved: safetensors refuses aliases, so write two copies, as PEFT does.
        aliased = any(t.data_ptr() == u.data_ptr() for u in tensors.values())
        tensors[peft_key(k)] = t.clone() if aliased else t
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft(), indent=2, sort_keys=True) + "\n")


def read_adapter_config(directory: str | os.PathLike[str]) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelFormatError(f"no {ADAPTER_CONFIG} in {directory}: not a PEFT LoRA adapter directory")
    try:
        return LoRAConfig.from_peft(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ModelFormatError(f"{path} is not a valid adapter config: {e}") from None


def read_adapter_tensors(directory: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A saved adapter's tensors, by our parameter names (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ModelFormatError(f"no {ADAPTER_WEIGHTS} in {directory}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"cannot read {path}: truncated or not safetensors: {e}") from None
    return {our_key(k): v for k, v in state.items()}


def load_adapter_weights(model: Llama, directory: str | os.PathLike[str]) -> None:
    """Copy a saved adapter's tensors into a model that already has matching LoRA layers."""
    ours = adapter_state_dict(model)
    loaded = read_adapter_tensors(directory)
    missing, unexpected = ours.keys() - loaded.keys(), loaded.keys() - ours.keys()
    tied_names = {"lm_head.weight", "model.embed_tokens.weight"}
    if model.config.tie_word_embeddings and tied_names & loaded.keys():
        missing -= tied_names  # one tensor under two names: either one carries it
    if missing or unexpected:
        raise ModelFormatError(f"adapter in {directory} does not fit this model: missing {sorted(missing)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, value in loaded.items():
            if value.shape != ours[name].shape:
                raise ModelFormatError(f"adapter tensor {name} has shape {tuple(value.shape)}, the model "
                                       f"expects {tuple(ours[name].shape)} (a different base model or rank?)")
            ours[name].copy_(value)


def load_adapter(base: Llama, directory: str | os.PathLike[str]) -> Llama:
    """A new model that shares `base`'s weights (no copy) with the adapter in `directory` applied.

    Each base model is loaded once; every fine-tune served on it costs only its adapter's memory.
    """
    config = read_adapter_config(directory)
    with torch.device("meta"):
        model = Llama(base.config)
    model.requires_grad_(False)  # frozen before the base's tensors go in (a 4-bit weight refuses requires_grad)
    model.load_state_dict(dict(base.named_parameters()), strict=False, assign=True)
    if base.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers(base.device)
    for module_name in config.modules_to_save or ():
        # A trained embed_tokens / lm_head replaces the shared one: give this model its own copy to load into.
        module = model.model.embed_tokens if module_name == "embed_tokens" else model.lm_head
        module.weight = nn.Parameter(module.weight.detach().clone())
        if base.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight = module.weight
    inject(model, config)
    if any(is_quantized(p) for p in base.parameters()):
        quantize_model(model)  # the shared weights are NF4: the layers LoRA did not wrap need the 4-bit forward
    load_adapter_weights(model, directory)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
