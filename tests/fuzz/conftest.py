"""A live API per database backend for the fuzzers: a real uvicorn server (in a thread, on a free port) over a data
dir whose `models/tiny-chat` is a tiny random Llama written there (a real directory, not a link, so the symlink
tests below plant their own), and real objects to aim at: a processed training file, a queued job, a fine-tune with
a checkpoint (adapter files where a worker leaves them). PostgreSQL runs with Redis, SQLite with the embedded
broker, as in tests/app."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from app.core.context import AppContext
from tests.app.conftest import TINY, chat_rows, jsonl, served_app, write_tiny_tokenizer
from tests.helpers import tiny_model

MAX_UPLOAD_BYTES = 256 * 1024


@dataclass
class Live:
    name: str
    settings: Settings
    ctx: AppContext
    base_url: str
    admin_key: str
    key: str
    other_key: str
    objects: dict[str, list[str]] = field(default_factory=dict)  # real ids by kind, for the fuzzers to aim at

    def http(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key or self.key}"}, **kwargs)


def write_tiny_model(directory: Path) -> Path:
    from unsloth_core.checkpoint import save_model

    write_tiny_tokenizer(directory.parent / ".tokenizer")
    model = tiny_model(seed=3, vocab_size=272, bos_token_id=None, eos_token_id=258, pad_token_id=256)
    return save_model(model, directory, tokenizer_dir=directory.parent / ".tokenizer")


def upload_training_file(live: Live, key: str | None = None) -> str:
    with live.http(key) as http:
        response = http.post("/v1/files", files={"file": ("train.jsonl", jsonl(chat_rows(12)))},
                             data={"purpose": "fine-tune"})
        return str(response.raise_for_status().json()["id"])


def create_job(live: Live, file_id: str, suffix: str, key: str | None = None) -> str:
    with live.http(key) as http:
        response = http.post("/v1/fine_tuning/jobs", json={"model": TINY, "training_file": file_id, "suffix": suffix})
        return str(response.raise_for_status().json()["id"])


def finish_job(live: Live, job_id: str) -> tuple[str, str]:
    """Do what a worker does: claim the job, save and record a checkpoint at step 2, save the final adapter and
    complete the job. Returns (fine-tune model id, checkpoint model id)."""
    from app.services import lifecycle
    from unsloth_core.checkpoint import load_model
    from unsloth_core.lora import apply_lora, save_adapter

    settings = live.settings
    adapter = apply_lora(load_model(settings.models_dir / TINY), r=4, alpha=8, seed=0)
    owner = "fuzz-worker"
    with live.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, job_id=job_id, attempt=0, owner=owner) is not None
        run = lifecycle.attempt_dir(settings, job_id, 0)
        save_adapter(adapter, run / "checkpoint-2", base_model_name_or_path=TINY)
        checkpoint = lifecycle.record_checkpoint(session=session, settings=settings, job_id=job_id, attempt=0,
                                                 owner=owner, step=2, metrics={"train_loss": 1.0},
                                                 adapter_dir=run / "checkpoint-2")
        assert checkpoint is not None
        save_adapter(adapter, run / "adapter", base_model_name_or_path=TINY)
        model = lifecycle.complete_job(session=session, settings=settings, job_id=job_id, attempt=0, owner=owner,
                                       adapter_dir=run / "adapter", trained_tokens=10)
        assert model is not None
    return model, checkpoint.model_id


def create_export(live: Live, model: str) -> str:
    with live.http() as http:
        response = http.post("/v1/exports", json={"model": model, "format": "gguf", "quantization": "f16"})
        return str(response.raise_for_status().json()["id"])


def make_objects(live: Live) -> None:
    """A processed file, a queued job, a finished one with a fine-tune and a checkpoint, and a queued export."""
    file_id = upload_training_file(live)
    queued, done = create_job(live, file_id, "fuzz"), create_job(live, file_id, "done")
    model, checkpoint = finish_job(live, done)
    live.objects = {"file": [file_id], "job": [queued, done], "model": [TINY, model, checkpoint],
                    "export": [create_export(live, model)]}


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    name = request.param
    data_dir = tmp_path_factory.mktemp(f"fuzz-{name}")
    write_tiny_model(data_dir / "models" / TINY)
    admin_key = "sk-test-admin-" + secrets.token_hex(8)
    overrides: dict[str, Any] = {"data_dir": data_dir, "api_key": admin_key, "max_concurrent_generations": 4,
                                 "event_poll_interval_s": 0.1, "max_upload_bytes": MAX_UPLOAD_BYTES}
    with served_app(name, "fuzz", overrides) as (settings, ctx, url, user_key, other_key):
        live = Live(name, settings, ctx, url, admin_key, user_key, other_key)
        make_objects(live)
        yield live
