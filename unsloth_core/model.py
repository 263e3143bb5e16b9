"""The Llama architecture: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, and a static KV cache.

Shape legend used in comments:
    B  batch            T  tokens in this call          S  KV-cache slots (static, preallocated)
    C  hidden size      H  query heads                  KVH key/value heads (GQA: H is a multiple of KVH)
    D  head dim         V  vocabulary

Parameter names are exactly HF transformers' (`model.layers.0.self_attn.q_proj.weight`, ...), so HF checkpoints
load without remapping and adapters get PEFT's key names. RoPE uses HF's half-split layout; llama.cpp's
interleaved layout is undone once, at GGUF import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsloth_core import kernels
from unsloth_core.config import LlamaConfig
from unsloth_core.merged import MergedProjections


@dataclass
class CausalLMOutput:
    """What `Llama.forward` returns, with transformers' field names so user code ports unchanged."""

    logits: Tensor | None = None
    loss: Tensor | None = None
    loss_sum: Tensor | None = None  # summed token losses, for normalising over a whole accumulation window
    n_tokens: Tensor | None = None  # number of target (non -100) tokens behind loss_sum
    n_correct: Tensor | None = None  # targets the model ranks first (only when asked: an argmax over the logits)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse frequencies (D/2,), in fp32, with llama3 frequency scaling when the config asks for it."""
    d = config.d_head
    # Always on the CPU (callers move it): under a meta-device context arange would import torch._dynamo (~2 s).
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, and the band between is interpolated.
    factor = scaling["factor"]
    low_freq_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_freq_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables (B, T, D) for the given positions; computed in fp32, then cast, as HF does."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def cache_slots(n_tokens: int) -> int:
    """The slots a KV cache for `n_tokens` gets: rounded up to a multiple of 8."""
    return (n_tokens + 7) // 8 * 8


class KVCache(nn.Module):
    """Preallocated keys and values (B, KVH, S, D): shapes never change, so a compiled decode step never retraces."""

    k: Tensor
    v: Tensor

    def __init__(self, batch_size: int, n_kv_heads: int, max_slots: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, row: int = 0) -> tuple[Tensor, Tensor]:
        """Write k, v (B, KVH, T, D) into cache rows [row, row + B) and return those rows whole.

        `input_pos` (T,) gives the slots, the same for every row (a left-padded batch); (B, T) gives each row its
        own slots (continuous batching, where every sequence starts at slot 0 of its row).
        """
        b = k.size(0)
        keys, values = self.k[row:row + b], self.v[row:row + b]
        if input_pos.dim() == 1:
            keys.index_copy_(2, input_pos, k)
            values.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(b, device=k.device)[:, None]
            keys[rows, :, input_pos] = k.transpose(1, 2)  # (B, T, KVH, D) at [row b, slot input_pos[b, t]]
            values[rows, :, input_pos] = v.transpose(1, 2)
        return keys, values

    def move_row(self, src: int, dst: int, n_slots: int) -> None:
        """Copy the first `n_slots` of row `src` into row `dst` (to keep a batch's live rows contiguous)."""
        self.k[dst, :, :n_slots] = self.k[src, :, :n_slots]
        self.v[dst, :, :n_slots] = self.v[src, :, :n_slots]


class AdapterLinear(nn.Linear):
    """What the blocks ask of a linear layer carrying a trainable adapter (LoRA's, in unsloth_core.lora, which
    imports this module): its parts for the fused LoRA Functions while the adapter is active, and its scale and
    dropout. A plain `nn.Linear` (or pooled serving adapters) is not one, and runs as itself."""

    def fusable_parts(self) -> kernels.LoRAProj | None:
        """(W, b, A, B) while the adapter is active (not disabled, not merged into W); None otherwise."""
        raise NotImplementedError

    def adapter_hparams(self) -> tuple[float, float]:
        """(scaling, dropout probability)."""
        raise NotImplementedError


def fused_lora(*layers: nn.Module) -> list[kernels.LoRAProj] | None:
    """(W, b, A, B) of each layer when all are active adapter layers with the same scaling and dropout, and
    gradients are being recorded or the layers are training: then a group's hand-written autograd Function replaces
    the per-layer graph. Else None.

    Training without grad is a checkpointed layer's forward, whose replay in backward records gradients: both must
    take this path, as each path draws its dropout masks its own way.
    """
    if not (kernels.fused_lora_enabled() and (torch.is_grad_enabled() or layers[0].training)):
        return None
    parts: list[kernels.LoRAProj] = []
    for layer in layers:
        part = layer.fusable_parts() if isinstance(layer, AdapterLinear) else None
        if part is None:
            return None
        parts.append(part)
    if len({lora_hparams(layer) for layer in layers}) != 1:
        return None
    return parts


def lora_hparams(layer: nn.Module) -> tuple[float, float]:
    assert isinstance(layer, AdapterLinear)
    return layer.adapter_hparams()


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA of q (B, H, T, D) over k, v (B, KVH, S, D), KVH dividing H; causal when there is no mask and T > 1.

    With a mask, no fused GPU kernel takes grouped KV heads (flash takes no mask; memory-efficient attention wants
    as many KV heads as query heads), and SDPA would fall back to its math kernel, which materialises every score in
    fp32. So a single query token (decode) folds each group's query heads into the query length, where they share
    the mask (B, 1, 1, S); longer masked queries (prefill of a padded batch, packed training rows) get K and V
    repeated per head.
    """
    b, h, t, d = q.shape
    groups = h // k.size(1)
    if mask is None or groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                              enable_gqa=groups > 1)
    if t == 1:
        y = F.scaled_dot_product_attention(q.reshape(b, k.size(1), groups, d), k, v, attn_mask=mask)
        # reshape, not view: CUDA's fused kernels return (B, KVH, G, D) as a transpose of a (B, G, KVH, D) tensor.
        return y.reshape(b, h, 1, d)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.n_kv_heads, config.d_head
        c, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=bias)
        self.merged = MergedProjections()  # q, k, v as one GEMM while the engine generates (merged.py)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None,
                cache_row: int = 0) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = kernels.rope(q, k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_row)  # (B, KVH, S, D)
            if mask is not None and mask.size(-1) < k.size(2):  # eager decoding reads only the slots in use
                k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fused = fused_lora(self.q_proj, self.k_proj, self.v_proj)
        if fused is not None:  # one autograd node that keeps only x for backward
            (q, k, v), (scale, dropout) = fused, lora_hparams(self.q_proj)
            return kernels.lora_qkv(x, q, k, v, scale, dropout, self.training)
        if self.merged.active():
            q, k, v = self.merged(x)
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(c, i, bias=bias)
        self.up_proj = nn.Linear(c, i, bias=bias)
        self.down_proj = nn.Linear(i, c, bias=bias)
        self.merged = MergedProjections()  # gate and up as one GEMM while the engine generates (merged.py)

    def forward(self, x: Tensor) -> Tensor:
        fused = fused_lora(self.gate_proj, self.up_proj, self.down_proj)
        if fused is not None:  # keeps x and the two pre-activations; recomputes the rest in backward
            (gate, up, down), (scale, dropout) = fused, lora_hparams(self.gate_proj)
            return kernels.lora_mlp(x, gate, up, down, scale, dropout, self.training)
        if self.merged.active():
            gate, up = self.merged(x)
            return self.down_proj(kernels.swiglu(gate, up))
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None,
                cache_row: int = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, cache_row)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `LlamaModel`: embeddings, the blocks and the final norm (named `model` inside `Llama`)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":  # on meta (loading a checkpoint) normal_ would import torch._dynamo: ~2 s
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def attention_mask_4d(attention_mask: Tensor | None, position_ids: Tensor | None, t: int,
                      device: torch.device) -> Tensor | None:
    """Boolean mask (B, 1, T, T) for a cache-less forward, or None when plain causal attention is exact.

    Keys are hidden when padding (`attention_mask` == 0) or when they belong to another sample of a packed row:
    a sample starts wherever `position_ids` resets to 0, so packed samples never attend to each other.
    """
    packed = position_ids is not None and t > 1 and bool((position_ids[:, 1:] == 0).any())
    if attention_mask is None and not packed:
        return None
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]  # (1, T, T)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    if packed:
        assert position_ids is not None
        doc = (position_ids == 0).cumsum(-1)  # (B, T): which sample of the row each token belongs to
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    # A query whose keys are all hidden (a left-padding position) would make softmax NaN; let it see itself.
    mask = mask | torch.eye(t, dtype=torch.bool, device=device)
    return mask[:, None]


def cache_mask(input_pos: Tensor, slot_mask: Tensor | None) -> Tensor:
    """Boolean mask (B, 1, T, S') for queries at cache slots `input_pos` over keys in slots [0, S').

    Shared slots (`input_pos` (T,)): causal over slots, restricted to the slots `slot_mask` (B, S') marks as real,
    and each query also sees its own slot, so a padding query never has every key hidden (softmax over nothing is
    NaN). Per-row slots (`input_pos` (B, T)): each row sees its own slots up to each query's, over the slots in use
    (a host read of the highest), or over the S' slots of `slot_mask` when given (a static width: a compiled step).
    """
    if input_pos.dim() == 2:
        if slot_mask is None:
            slots = torch.arange(int(input_pos.max()) + 1, device=input_pos.device)
            return (slots <= input_pos[..., None])[:, None]
        slots = torch.arange(slot_mask.size(-1), device=input_pos.device)
        return ((slots <= input_pos[..., None]) & slot_mask.bool()[:, None, :])[:, None]
    n_slots = slot_mask.size(-1) if slot_mask is not None else int(input_pos.max()) + 1
    slots = torch.arange(n_slots, device=input_pos.device)
    causal = slots[None, :] <= input_pos[:, None]  # (T, S')
    mask = causal[None, None] if slot_mask is None else causal[None, None] & slot_mask.bool()[:, None, None, :]
    return mask | (slots[None, :] == input_pos[:, None])[None, None]


class Llama(nn.Module):
    """Llama for causal LM: `forward(input_ids, position_ids, attention_mask, labels)` as in transformers."""

    inv_freq: Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.lora_config: Any = None  # a LoRAConfig once unsloth_core.lora has injected adapters
        # what DPO's and GRPO's reference policy swaps in when training continues an earlier fine-tune (lora.py)
        self.reference_adapter: dict[str, Tensor] | None = None
        # Training only: False, True (recompute each block in backward) or "offload" (keep block inputs on the host)
        self.gradient_checkpointing: bool | str = False
        self.max_seq_length: int | None = None  # the context generation may use (None: max_position_embeddings)
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Where the weights are (a `with torch.device("cuda")` build), except on meta: init_buffers makes it there.
        device = self.lm_head.weight.device
        inv_freq = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq if device.type == "meta" else inv_freq.to(device), persistent=False)

    # ---- construction ----

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random init as HF's `initializer_range`: normal(0, std) for linear and embedding weights, ones for norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                with torch.no_grad():
                    module.weight.copy_(w)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        module.bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild non-persistent buffers (after building on the meta device and loading weights)."""
        device = device if device is not None else self.lm_head.weight.device
        self.inv_freq = rope_inv_freq(self.config).to(device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def blocks(self) -> list[Block]:
        return [cast(Block, b) for b in self.model.layers]

    # ---- KV cache ----

    def setup_caches(self, batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a static KV cache for generation; slots are rounded up to a multiple of 8."""
        for block, cache in zip(self.blocks(), self.new_caches(batch_size, max_seq_length, dtype), strict=True):
            block.self_attn.kv_cache = cache

    def new_caches(self, batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One layer's KV cache per block, all allocated before any is installed (`cache_slots` slots each)."""
        slots, dtype = cache_slots(max_seq_length), dtype or self.dtype
        return [KVCache(batch_size, self.config.n_kv_heads, slots, self.config.d_head, dtype, self.device)
                for _ in self.blocks()]

    def clear_caches(self) -> None:
        for block in self.blocks():
            block.self_attn.kv_cache = None

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(batch, slots) of the KV cache, or None when there is none."""
        cache = self.blocks()[0].self_attn.kv_cache
        return None if cache is None else (cache.k.size(0), cache.k.size(2))

    # ---- forward ----

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None,
                      attention_mask: Tensor | None = None, input_pos: Tensor | None = None,
                      cache_row: int = 0) -> Tensor:
        """Final-norm hidden states (B, T, C).

        Without a cache, `attention_mask` (B, T) marks real tokens. With a cache (`input_pos` (T,) = the slots these
        tokens occupy), `attention_mask` (B, S') marks which of the first S' cache slots hold real tokens (S' may be
        less than the cache's S: attention then reads only those slots), and `position_ids` carry each sample's own
        positions (they differ from the slots when prompts are left-padded). Per-row slots (`input_pos` (B, T)) are
        also each row's positions; `cache_row` is the cache row of batch row 0.
        """
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
            if input_pos is not None:
                position_ids = input_pos if input_pos.dim() == 2 else position_ids + input_pos[:1]
        mask = (cache_mask(input_pos, attention_mask) if input_pos is not None
                else attention_mask_4d(attention_mask, position_ids, t, input_ids.device))
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_tables(self.inv_freq, position_ids, x.dtype)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks():
            if checkpointing:
                x = kernels.checkpoint(block, x, cos, sin, mask, input_pos,
                                       offload=self.gradient_checkpointing == "offload")
            else:
                x = block(x, cos, sin, mask, input_pos, cache_row)
        return self.model.norm(x)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, input_pos: Tensor | None = None, return_logits: bool = True,
                accuracy: bool = False) -> CausalLMOutput:
        """Logits (B, T, V) and, given `labels` (B, T), the mean next-token loss over labels != -100.

        Labels are shifted inside, as in transformers. `return_logits=False` with labels computes the loss chunk by
        chunk so the full logits never exist (the training path); `accuracy` also counts correct argmax predictions.
        """
        h = self.hidden_states(input_ids, position_ids, attention_mask, input_pos)
        out = CausalLMOutput()
        if return_logits:
            out.logits = self.lm_head(h)
        if labels is not None:
            shifted = F.pad(labels, (0, 1), value=kernels.IGNORE_INDEX)[:, 1:].reshape(-1)
            flat = h.reshape(-1, h.size(-1))
            if accuracy:  # counted by the loss from its own logits: no second pass through the head
                out.n_correct = torch.zeros((), dtype=torch.long, device=flat.device)
            out.loss_sum, out.n_tokens = kernels.linear_cross_entropy(flat, self.lm_head.weight, shifted,
                                                                      correct=out.n_correct)
            out.loss = out.loss_sum / out.n_tokens.clamp(min=1)
        return out

    # ---- transformers / Unsloth conveniences (the work is done in generate.py, checkpoint.py and lora.py) ----

    def generate(self, input_ids: Any = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """transformers-style: returns prompt + new token ids; see `unsloth_core.generate.generate_ids`. The prompt
        may also come as `inputs=` (transformers' name) or as the mapping a tokenizer returns."""
        from unsloth_core.generate import generate_ids

        if "inputs" in kwargs:
            if input_ids is not None:
                raise ValueError("give the prompt as input_ids or as inputs, not both")
            input_ids = kwargs.pop("inputs")
        if input_ids is None:
            raise ValueError("generate needs input_ids (a (batch, tokens) tensor of the prompt's ids)")
        return generate_ids(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, directory: str, tokenizer: Any = None) -> None:
        """The adapter (PEFT format) when the model has LoRA adapters, else the whole model (HF format)."""
        from unsloth_core.checkpoint import save_model
        from unsloth_core.lora import save_adapter

        if self.lora_config is not None:
            save_adapter(self, directory)
        else:
            save_model(self, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def save_pretrained_merged(self, directory: str, tokenizer: Any = None,
                               save_method: str = "merged_16bit") -> dict[str, Any] | None:
        """Unsloth's export: "lora" (the adapter), "merged_16bit" / "merged_32bit" (adapters folded in, HF format,
        read back by our loader and by transformers and compared with this model before the directory appears;
        returns that report, also in `verification.json`). The merge happens on a copy, so this model keeps
        training or serving with its adapters. As in Unsloth, "merged_4bit" is refused: a 4-bit merge loses the
        adapter's precision (use merged_16bit, or save_pretrained_gguf with a 4-bit type to run it small)."""
        from unsloth_core.export_merged import save_merged

        if save_method == "lora":
            self.save_pretrained(directory, tokenizer)
            return None
        if save_method in ("merged_4bit", "merged_4bit_forced"):
            raise ValueError(f"save_method={save_method!r}: merging into 4 bits loses what the adapter learnt and "
                             "cannot be merged again later; save 'merged_16bit', or a GGUF with a 4-bit "
                             "quantization_method (q4_0, q4_1) to run the model small")
        types = {"merged_16bit": "bf16" if self.dtype == torch.bfloat16 else "f16", "merged_32bit": "f32"}
        if save_method not in types:
            raise ValueError(f"save_method must be 'lora', 'merged_16bit' or 'merged_32bit', not {save_method!r}")
        return save_merged(self, directory, tokenizer, types[save_method])

    def save_pretrained_gguf(self, directory: str, tokenizer: Any,
                             quantization_method: str | list[str] = "fast_quantized",
                             ollama: bool = True) -> list[dict[str, Any]]:
        """Unsloth's GGUF export: `directory/model.<TYPE>.gguf` per quantization method (f32, f16, bf16, q8_0,
        q5_1, q5_0, q4_1, q4_0; Unsloth's "not_quantized" is f16, "fast_quantized" q8_0), adapters merged first,
        an Ollama `Modelfile` and `verification.json`. Every file is read back and compared with this model before
        the directory appears; returns those reports (see export_verify.py)."""
        from unsloth_core.export import save_gguf

        if tokenizer is None:
            raise ValueError("save_pretrained_gguf needs the tokenizer: the GGUF file carries it")
        return save_gguf(self, directory, tokenizer, quantization_method, ollama=ollama)
