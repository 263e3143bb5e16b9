"""Giving memory back to the device between pieces of work that share a GPU (jobs, served models)."""

from __future__ import annotations

import gc

import torch


def release_memory(collect: bool = True) -> None:
    """Return torch's cached, unused GPU blocks to the device, so another process sharing it (a training job, an
    API serving models) can use them. `collect` first frees garbage held in reference cycles (autograd graphs,
    exception frames), which would otherwise keep tensors alive until some later collection."""
    if collect:
        gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
