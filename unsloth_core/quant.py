"""4-bit NormalFloat (NF4) base weights, QLoRA's format: `load_in_4bit=True`.

A frozen projection weight is stored as one 4-bit index per element into a 16-value codebook (the NF4 levels:
quantiles of a standard normal, so normally distributed weights use every level about equally) and one fp32 absmax
per block of 64 consecutive elements, 4.5 bits per weight instead of 16. Element order, nibble order and blocks are
bitsandbytes' (`quant_type="nf4"`, no double quantization), so the stored numbers are the ones Unsloth's QLoRA
trains against.

`NF4Tensor` is a tensor subclass that keeps that storage and reports the dense shape and a compute dtype, so it sits
in an `nn.Linear` as `weight` (frozen) and travels with the model: `.to(device)`, `state_dict`, deepcopy. Every
projection is computed through `linear_4bit`, which dequantizes into a temporary for the matmul and again in
backward, so autograd never keeps a dense copy of a frozen weight (a per-layer 16-bit temporary lives only while its
matmul runs). The fused LoRA kernels call `dense()` on their base weights the same way. The exception is inference
on a CPU (`keep_dense`, switched on by `FastLanguageModel.for_inference`): there dequantizing costs several times
the decode step's matmuls, so each weight keeps its dense value until training or a change of the weight drops it.
Any other op on an NF4Tensor
runs on its dequantized value; ops that would write into one (in place or through `out=`) are refused, except
`copy_`, which requantizes. A view or slice of one (`w[0]`, `w.t()`) is a dequantized copy: writing into it does
not change the weight. An NF4 weight cannot be trained: asking for its gradient is an error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_map

from unsloth_core.config import PROJECTIONS
from unsloth_core.kernels import reference
from unsloth_core.kernels.backend import use_triton

BLOCKSIZE = 64
QUANTIZED_MODULES = PROJECTIONS

aten = torch.ops.aten


@functools.cache
def _nf4_levels() -> tuple[float, ...]:
    """QLoRA's NF4 levels: 8 positive and 7 negative normal quantiles, equally spaced in probability between
    1 - delta and 1/2 (delta = 0.0322917, so the extreme quantile is finite), plus an exact zero, scaled to [-1, 1].
    The probabilities are spaced in fp32, as bitsandbytes spaces them, so the table is bit for bit its table."""
    delta = 0.9677083
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return tuple((levels / levels.max()).tolist())  # normalised in fp32, as bitsandbytes builds its table


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The 16 NF4 levels (fp32, ascending) on `device`."""
    return torch.tensor(_nf4_levels(), dtype=torch.float32, device=device)


def dequantize(packed: Tensor, absmax: Tensor, code: Tensor, numel: int, blocksize: int, dtype: torch.dtype) -> Tensor:
    """Dense values of 4-bit blockwise weights: Triton on a GPU (when switched on), the plain-torch twin elsewhere."""
    if use_triton("nf4_dequantize", packed):
        from unsloth_core.kernels.nf4 import nf4_dequantize

        return nf4_dequantize(packed, absmax, code, numel, blocksize, dtype)
    return reference.nf4_dequantize(packed, absmax, code, numel, blocksize, dtype)


def quantize_blocks(weight: Tensor, blocksize: int = BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """(packed uint8 indices, fp32 absmax per block) of `weight`, each element rounded to the nearest NF4 level.

    The tail is padded with zeros to a whole block. An all-zero block gets absmax 0 and the zero level.
    """
    if blocksize % 2:
        raise ValueError(f"blocksize must be even (two indices per byte), got {blocksize}")
    flat = weight.detach().reshape(-1).float()
    flat = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    absmax = flat.abs().amax(dim=1)
    normed = flat / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    code = nf4_code(weight.device)
    # Nearest level: bucketize against the midpoints (a value on a midpoint goes to the lower level).
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8).view(-1, 2)
    return (idx[:, 0] << 4) | idx[:, 1], absmax


class NF4Tensor(torch.Tensor):
    """A frozen weight in NF4: dense shape and compute dtype outside, 4-bit indices and block scales inside."""

    packed: Tensor
    absmax: Tensor
    code: Tensor
    blocksize: int
    # While `keep` is on (keep_dense), the last dense value a product asked for, keyed by its dtype and the version
    # counters of the 4-bit storage: any write into the storage makes the key stale, so a changed weight is never
    # read from an old copy.
    keep: bool = False
    kept: tuple[tuple[torch.dtype, int, int], Tensor] | None = None

    @staticmethod
    def __new__(cls, packed: Tensor, absmax: Tensor, code: Tensor, shape: torch.Size | tuple[int, ...],
                blocksize: int, dtype: torch.dtype) -> NF4Tensor:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed: Tensor, absmax: Tensor, code: Tensor, shape: torch.Size | tuple[int, ...],
                 blocksize: int, dtype: torch.dtype) -> None:
        self.packed, self.absmax, self.code, self.blocksize = packed, absmax, code, blocksize

    @classmethod
    def from_dense(cls, weight: Tensor, blocksize: int = BLOCKSIZE, dtype: torch.dtype | None = None) -> NF4Tensor:
        """Quantize `weight`; the result computes in `dtype` (default: weight's dtype)."""
        packed, absmax = quantize_blocks(weight, blocksize)
        return cls(packed, absmax, nf4_code(weight.device), weight.shape, blocksize, dtype or weight.dtype)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized weight, a new plain tensor in `dtype` (default: the compute dtype)."""
        out = dequantize(self.packed, self.absmax, self.code, self.numel(), self.blocksize, dtype or self.dtype)
        return out.view(self.shape)

    def matmul_weight(self, dtype: torch.dtype) -> Tensor:
        """The dense weight in `dtype` for a product: the kept copy while `keep` is on (read it, never write into
        it), else `dense(dtype)`."""
        if not self.keep:
            return self.dense(dtype)
        key = (dtype, _version(self.packed), _version(self.absmax))
        if self.kept is None or self.kept[0] != key:
            self.kept = None  # the stale copy goes before the new one is made: never two at once
            with torch.inference_mode(False):  # made inside generation, it may still be read by autograd later
                self.kept = (key, self.dense(dtype))
        return self.kept[1]

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax))

    def _rewrap(self, fn: Callable[[Tensor], Tensor], dtype: torch.dtype | None = None) -> NF4Tensor:
        return NF4Tensor(fn(self.packed), fn(self.absmax), fn(self.code), self.shape, self.blocksize,
                         dtype or self.dtype)

    def __repr__(self) -> str:  # type: ignore[override]
        return (f"NF4Tensor(shape={tuple(self.shape)}, blocksize={self.blocksize}, dtype={self.dtype}, "
                f"device={self.device})")

    def __deepcopy__(self, memo: dict[int, Any]) -> NF4Tensor:
        copied = _rebuild(self.packed.clone(), self.absmax.clone(), self.code.clone(), tuple(self.shape),
                          self.blocksize, self.dtype, _is_param(self))
        memo[id(self)] = copied
        return copied

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickling: the 4-bit storage, and whether it is a Parameter
        return _rebuild, (self.packed, self.absmax, self.code, tuple(self.shape), self.blocksize, self.dtype,
                          _is_param(self))

    def requires_grad_(self, requires_grad: bool = True) -> NF4Tensor:
        if requires_grad:
            raise RuntimeError("a 4-bit (NF4) weight cannot be trained; train LoRA adapters on it, or load the "
                               "model without load_in_4bit to train this weight")
        return super().requires_grad_(False)  # type: ignore[return-value]

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        return ["packed", "absmax", "code"], (tuple(self.shape), self.blocksize, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], meta: tuple[Any, ...], outer_size: Any,
                             outer_stride: Any) -> NF4Tensor:
        shape, blocksize, dtype = meta
        return NF4Tensor(inner["packed"], inner["absmax"], inner["code"], shape, blocksize, dtype)

    def _stable_hash_for_caching(self) -> str:
        """torch.compile's artifact cache key for this subclass: its metadata (the inner tensors are keyed apart)."""
        return f"NF4Tensor:{tuple(self.shape)}:{self.blocksize}:{self.dtype}"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),  # type: ignore[override]
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)  # positional, or keyword such as out=
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, NF4Tensor):
                raise RuntimeError(f"{func} would write into a 4-bit (NF4) weight; 4-bit base weights are frozen "
                                   f"(train LoRA adapters on them, or load the model without load_in_4bit)")
        return func(*tree_map(lambda t: t.dense() if isinstance(t, NF4Tensor) else t, args),
                    **tree_map(lambda t: t.dense() if isinstance(t, NF4Tensor) else t, kwargs))


def _version(t: Tensor) -> int:
    """The in-place write counter (an inference tensor has none; only `copy_` writes into it, and drops the copy)."""
    return -1 if t.is_inference() else t._version


def _is_param(t: Tensor) -> bool:
    return bool(getattr(t, "_is_param", False))


def _rebuild(packed: Tensor, absmax: Tensor, code: Tensor, shape: tuple[int, ...], blocksize: int,
             dtype: torch.dtype, is_param: bool = False) -> NF4Tensor:
    """An NF4Tensor from its parts (copies and unpickling), a frozen Parameter again if it was one."""
    t = NF4Tensor(packed, absmax, code, shape, blocksize, dtype)
    return nn.Parameter(t, requires_grad=False) if is_param else t  # type: ignore[return-value]


def _detach(t: NF4Tensor) -> NF4Tensor:
    return t._rewrap(lambda x: x)


def _to_copy(t: NF4Tensor, dtype: torch.dtype | None = None, device: torch.device | None = None,
             **_: Any) -> NF4Tensor:
    """A copy, as `.to()` makes: a device move moves the storage, a dtype change only changes the compute dtype
    (the levels stay 4-bit)."""
    return t._rewrap(lambda x: x.to(device, copy=True) if device is not None else x.clone(), dtype)


def _copy(dst: Tensor, src: Tensor, *_: Any, **__: Any) -> Tensor:
    """Into a 4-bit weight: takes src's storage if it is NF4 too, else quantizes src. Into a plain tensor: the
    dequantized values (loading a 4-bit state dict into a 16-bit model)."""
    if not isinstance(dst, NF4Tensor):
        assert isinstance(src, NF4Tensor)
        return dst.copy_(src.dense(dst.dtype).to(dst.device))
    if src.shape != dst.shape:
        raise RuntimeError(f"cannot copy a tensor of shape {tuple(src.shape)} into a 4-bit weight of shape "
                           f"{tuple(dst.shape)}")
    if isinstance(src, NF4Tensor) and src.blocksize == dst.blocksize:
        packed, absmax = src.packed, src.absmax
    else:
        packed, absmax = quantize_blocks(src.dense() if isinstance(src, NF4Tensor) else src, dst.blocksize)
    dst.packed.copy_(packed)
    dst.absmax.copy_(absmax)
    dst.kept = None  # stale now (the version key would say so too); free it at once
    return dst


_HANDLERS: dict[Any, Callable[..., Any]] = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: lambda t, **_: t._rewrap(torch.clone),
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy,
    aten.is_same_size.default: lambda a, b: a.shape == b.shape,
}


def is_quantized(t: Tensor | None) -> bool:
    return isinstance(t, NF4Tensor)


def dense(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A weight as a plain tensor: dequantized when it is 4-bit, else itself (cast when `dtype` is given)."""
    if isinstance(weight, NF4Tensor):
        return weight.dense(dtype)
    return weight if dtype is None else weight.to(dtype)


def _matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a matmul with `weight` runs in: autocast's when it is on, else the weight's compute dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class Linear4bitFunction(torch.autograd.Function):
    """x W^T + b with W in NF4: W is dequantized for the product and again for dx, never saved dense."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: NF4Tensor, bias: Tensor | None) -> Tensor:
        dtype = _matmul_dtype(x, weight)
        ctx.weight, ctx.x_dtype, ctx.has_bias = weight, x.dtype, bias is not None
        return F.linear(x.to(dtype), weight.matmul_weight(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        dx = (dy @ ctx.weight.dense(dy.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` that also takes a 4-bit weight (then through `Linear4bitFunction`)."""
    if isinstance(weight, NF4Tensor):
        return Linear4bitFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear4bit(nn.Linear):
    """An `nn.Linear` whose frozen weight is an NF4Tensor (same names, so checkpoints and LoRA see a Linear)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4 blocksize={getattr(self.weight, 'blocksize', None)}"


def quantize_linear(layer: nn.Linear, blocksize: int = BLOCKSIZE) -> nn.Linear:
    """`layer` with its weight in NF4: a new Linear4bit for a plain Linear; a LoRA layer is changed in place (it
    keeps its class and adapters and computes its base product through `linear`)."""
    weight = layer.weight
    if not isinstance(weight, NF4Tensor):
        weight = NF4Tensor.from_dense(weight.detach(), blocksize)
    if type(layer) is nn.Linear:
        with torch.device("meta"):
            new = Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None)
        new.bias = layer.bias
        layer = new
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def quantize_model(model: nn.Module, blocksize: int = BLOCKSIZE,
                   modules: tuple[str, ...] = QUANTIZED_MODULES) -> nn.Module:
    """Put the seven projections of every block in NF4 (in place), as bitsandbytes' `load_in_4bit` does; the
    embedding, norms and LM head stay in their dtype. Weights that are already NF4 are kept as they are."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in modules:
                setattr(parent, name, quantize_linear(child, blocksize))
    return model


def keep_dense(model: nn.Module, keep: bool = True) -> int:
    """Let each 4-bit weight of `model` keep its dequantized value between products (`keep`), or drop the kept
    values and stop keeping them; returns how many weights it set.

    For inference on a CPU: there the dequantization of a weight costs several times its decode-step product, and
    every generated token paid it once per weight. Kept, the projections take their 16/32-bit size in host memory
    again (for SmolLM2-135M in fp32 about 0.4 GB more), which is why training drops them (`for_training`, the
    trainer's start): QLoRA trains against the 4-bit storage in its 4-bit footprint. Not for a GPU, where the
    dequantize kernel is cheap beside the product and the memory saved is the reason to load in 4-bit."""
    n = 0
    for p in model.parameters():
        if isinstance(p, NF4Tensor):
            p.keep, p.kept, n = keep, p.kept if keep else None, n + 1
    return n


def should_quantize(name: str, modules: tuple[str, ...] = QUANTIZED_MODULES) -> bool:
    """Whether a checkpoint tensor name is a weight that `load_in_4bit` stores in NF4."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in modules


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take, counting 4-bit weights at their real size."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.storage_bytes() if isinstance(t, NF4Tensor) else t.numel() * t.element_size()
    return total
