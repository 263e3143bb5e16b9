"""Per-token log-probabilities (and entropies) of sampled completions, from the LM head in chunks.

Rows are prompt + completion, right-padded: each row sits at positions 0..T-1 exactly as it was sampled, and causal
attention never lets a real token see the padding after it, so no mask is needed. Only the hidden states that
predict a completion token go through the LM head, in chunks of `chunk_tokens`, each recomputed in backward
rather than stored: the (tokens, vocab) logits of a whole rollout never exist at once (for SmolLM2 a 256-token
completion is 50 MB of fp32 logits per row).

The logits are divided by the sampling temperature first, as TRL does, so that log p is that of the distribution
the tokens were drawn from (top-p/top-k truncation aside, as in TRL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unsloth_core.model import Llama

# Tokens whose vocabulary-wide logits exist at once: the head's (chunk, vocab) fp32 block is most of the peak. On the
# CPU, 256 measured the same step time as 2048 at 0.5x TRL's peak instead of 0.66x (bench/RESULTS.md, GRPO section).
CHUNK_TOKENS = 2048
CHUNK_TOKENS_CPU = 256


def completion_logprobs(model: Llama, sequences: Tensor, starts: Sequence[int], lengths: Sequence[int],
                        temperature: float = 1.0, with_entropy: bool = False, chunk_tokens: int | None = None
                        ) -> tuple[Tensor, Tensor | None]:
    """(rows, W) fp32 log p of each completion token given everything before it, W = max(lengths); 0 past a row's
    length. With `with_entropy`, also each position's entropy (nats, no gradient).

    sequences: (rows, T) token ids, prompt then completion, right-padded; starts: where each row's completion
    begins (its prompt's length, at least 1); lengths: its completion tokens to score.
    """
    rows, width = len(starts), max(lengths, default=0)
    device = sequences.device
    chunk_tokens = chunk_tokens or (CHUNK_TOKENS_CPU if device.type == "cpu" else CHUNK_TOKENS)
    # Flat indices of the scored tokens, built on the host: no device sync.
    row_idx = [r for r in range(rows) for _ in range(lengths[r])]
    col_idx = [c for r in range(rows) for c in range(lengths[r])]
    pos_idx = [starts[r] + c for r, c in zip(row_idx, col_idx)]
    r_t, c_t, p_t = (torch.tensor(x, dtype=torch.long).to(device) for x in (row_idx, col_idx, pos_idx))
    hidden = model.hidden_states(sequences)[r_t, p_t - 1]  # (N, C): the state that predicts each scored token
    targets = sequences[r_t, p_t]
    parts, entropies = [], []
    for i in range(0, hidden.size(0), chunk_tokens):
        h, t = hidden[i:i + chunk_tokens], targets[i:i + chunk_tokens]
        if torch.is_grad_enabled() and (h.requires_grad or model.lm_head.weight.requires_grad):
            lp, ent = checkpoint(_head, model.lm_head, h, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _head(model.lm_head, h, t, temperature, with_entropy)
        parts.append(lp)
        entropies.append(ent)
    flat = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    logps = flat.new_zeros(rows, width).index_put((r_t, c_t), flat)
    if not with_entropy:
        return logps, None
    ent_flat = torch.cat(entropies) if entropies else flat.detach()
    return logps, logps.new_zeros(rows, width).index_put((r_t, c_t), ent_flat).detach()


def _head(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, with_entropy: bool
          ) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float() / temperature
    lse = logits.logsumexp(-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logps, logps.new_zeros(0)
    with torch.no_grad():  # H = logsumexp - E_p[logit]
        entropy = lse.detach() - (logits.detach().softmax(-1) * logits.detach()).sum(-1)
    return logps, entropy
