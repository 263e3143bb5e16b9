"""The API under test: one real uvicorn server per database backend (SQLite with the embedded SQLAlchemy broker, as
`make serve` runs; PostgreSQL with Redis, as compose runs), each in a thread of this process on a free port, driven
over HTTP by the real `openai` package. Built once per session and backend; tests isolate themselves by making their
own objects (and keys, where ownership matters).

The base model is a tiny random Llama with a byte-level ChatML tokenizer, written as a Hugging Face directory in
`<data dir>/models/tiny-chat` (and once more under `test-org/tiny-chat`, for ids with a `/`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest
import uvicorn
from kombu import Connection
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from app.core.config import Settings, load_settings
from app.core.context import AppContext
from app.db import migrate
from app.main import create_app
from app.services import keys
from tests.conftest import tiny_model

PG_ADMIN_URL = os.environ.get("UNSLOTH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("UNSLOTH_TEST_REDIS", "redis://127.0.0.1:6379/0")
TINY = "tiny-chat"
TINY_SLASHED = "test-org/tiny-chat"

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ---- the tiny model ----


def write_tiny_tokenizer(directory: Path) -> None:
    """One token per byte (ids 0-255) plus `<|endoftext|>` 256, `<|im_start|>` 257, `<|im_end|>` 258 (EOS)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(CHATML)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unsloth_core.checkpoint import save_model

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(root / "tokenizer")
    model = tiny_model(seed=3, vocab_size=272, bos_token_id=None, eos_token_id=258, pad_token_id=256)
    return save_model(model, root / TINY, tokenizer_dir=root / "tokenizer")


# ---- the servers ----


class ServerThread:
    """uvicorn serving `app` from a thread, on a socket we bound (so the port is known and free)."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@dataclass
class Backend:
    name: str
    settings: Settings
    ctx: AppContext
    base_url: str
    admin_key: str
    user_key: str
    other_key: str

    def client(self, key: str | None = None, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=key or self.user_key, **kwargs)

    def new_key(self, name: str = "test") -> str:
        with self.ctx.sessions() as session:
            return keys.create_key(session=session, name=name)[1]

    def queued_messages(self) -> list[tuple[str, list[Any]]]:
        """Drain the broker's `gpu` queue: (task name, args) per message."""
        out = []
        options = self.settings.broker_transport_options
        with Connection(self.settings.broker_url, transport_options=options) as conn:
            queue = conn.SimpleQueue("gpu")
            try:
                while True:
                    try:
                        message = queue.get(block=False)  # sent before the API answered
                    except queue.Empty:
                        break
                    args, _kwargs, _embed = message.decode()
                    out.append((message.headers["task"], list(args)))
                    message.ack()
            finally:
                queue.close()
        return out


def _link_models(data_dir: Path, tiny: Path, extra: dict[str, Path]) -> None:
    models_dir = data_dir / "models"
    (models_dir / "test-org").mkdir(parents=True, exist_ok=True)
    (models_dir / TINY).symlink_to(tiny, target_is_directory=True)
    (models_dir / TINY_SLASHED).symlink_to(tiny, target_is_directory=True)
    for name, path in extra.items():
        (models_dir / name).symlink_to(path, target_is_directory=True)


@pytest.fixture(scope="session")
def extra_base_models() -> dict[str, Path]:
    """Further base models linked into every data dir (the SmolLM2 test adds none here: it has its own app)."""
    return {}


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
            extra_base_models: dict[str, Path]) -> Iterator[Backend]:
    name = request.param
    data_dir = tmp_path_factory.mktemp(f"data-{name}")
    _link_models(data_dir, tiny_model_dir, extra_base_models)
    admin_key = "sk-test-admin-" + secrets.token_hex(8)
    overrides: dict[str, Any] = {"data_dir": data_dir, "api_key": admin_key, "max_concurrent_generations": 2,
                                 "event_poll_interval_s": 0.1, "max_upload_bytes": 256 * 1024}
    with served_app(name, "test", overrides) as (settings, ctx, url, user_key, other_key):
        yield Backend(name, settings, ctx, url, admin_key, user_key, other_key)


@contextlib.contextmanager
def served_app(backend: str, tag: str, overrides: dict[str, Any]
               ) -> Iterator[tuple[Settings, AppContext, str, str, str]]:
    """The API (uvicorn on a thread) on SQLite, or on a private PostgreSQL database and Redis key prefix, with two
    user keys: yields (settings, context, base URL, user key, other user's key). The database and the broker's keys
    are dropped on the way out."""
    db_name = f"unsloth_{tag}_{secrets.token_hex(4)}"
    prefix = f"unsloth-{tag}-{secrets.token_hex(4)}:"
    if backend == "postgresql":
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db_name
        overrides = {**overrides, "database_url": url, "broker_url": REDIS_URL,
                     "broker_transport_options": {"global_keyprefix": prefix}}
        settings = load_settings(**overrides)
        migrate.upgrade(settings.database_url)  # compose's `migrate` service; the API only checks the revision
    else:
        settings = load_settings(**overrides)  # SQLite: the API migrates at start, as `make serve` does
    app = create_app(settings)
    ctx: AppContext = app.state.ctx
    try:
        with ServerThread(app) as server:
            with ctx.sessions() as session:
                user_key = keys.create_key(session=session, name="user")[1]
                other_key = keys.create_key(session=session, name="other")[1]
            yield settings, ctx, f"http://127.0.0.1:{server.port}", user_key, other_key
    finally:
        ctx.close()
        if backend == "postgresql":
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            import redis

            r = redis.Redis.from_url(REDIS_URL)
            for k in r.scan_iter(match=f"{prefix}*"):
                r.delete(k)


@pytest.fixture
def client(backend: Backend) -> openai.OpenAI:
    return backend.client()


# ---- data ----


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    from unsloth_core.data.synthetic import fact_rows

    return fact_rows(n, seed=seed)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client: openai.OpenAI, content: bytes, name: str = "train.jsonl") -> Any:
    return client.files.create(file=(name, content), purpose="fine-tune")


@pytest.fixture
def training_file(client: openai.OpenAI) -> str:
    return str(upload(client, jsonl(chat_rows(12))).id)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- a real adapter, trained by the engine for a few steps (once per session) ----


@dataclass
class TrainedRun:
    checkpoints: list[tuple[int, Path, dict[str, Any]]]  # (step, adapter dir, metrics), oldest first

    @property
    def final(self) -> tuple[int, Path, dict[str, Any]]:
        return self.checkpoints[-1]


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """LoRA on the tiny model, 6 steps, a checkpoint every 2: what a worker would leave on disk."""
    from unsloth_core.checkpoint import load_model
    from unsloth_core.data import load_examples, tokenize_sft
    from unsloth_core.lora import apply_lora
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.trainer import TrainArgs, Trainer, TrainerCallbacks

    out = tmp_path_factory.mktemp("run")
    data = out / "train.jsonl"
    data.write_bytes(jsonl(chat_rows(16)))
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    rows = [tokenize_sft(e, tokenizer, 128) for e in load_examples(data, purpose="sft")]  # type: ignore[arg-type]
    model = apply_lora(load_model(tiny_model_dir), r=4, alpha=8, seed=0)
    saved: list[tuple[int, Path, dict[str, Any]]] = []

    class Record(TrainerCallbacks):
        def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
            saved.append((step, path, {"train_loss": metrics.get("loss")}))

    args = TrainArgs(output_dir=str(out), max_steps=6, save_steps=2, micro_batch_size=2, gradient_accumulation_steps=1,
                     learning_rate=5e-2, max_seq_length=128, seed=0)
    Trainer(model, args, rows, callbacks=Record(), pad_id=256, base_model=TINY,
            artifact_files={"chat_template.jinja": tiny_model_dir / "chat_template.jinja"}).train()
    assert [s for s, _, _ in saved] == [2, 4, 6]
    return TrainedRun(saved)


# ---- a fine-tune as the worker would leave it (rows + adapter dirs), per backend ----


@dataclass
class FineTune:
    job_id: str
    model: str  # ft:tiny-chat:<suffix>:<job id>
    checkpoints: list[str]  # checkpoint model ids, oldest first
    key: str  # the owner's API key


def make_fine_tune(backend: Backend, run: TrainedRun, key: str, suffix: str = "unit") -> FineTune:
    """Create a job over the API, then do what a worker does: claim it, record each checkpoint, finish it."""
    from app.services import lifecycle

    client = backend.client(key)
    training = upload(client, jsonl(chat_rows(16)))
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training.id, suffix=suffix)
    settings = backend.settings
    owner = "test-worker@" + secrets.token_hex(2)
    with backend.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, job_id=job.id, attempt=0, owner=owner) is not None
        job_dir = lifecycle.job_dir(settings, job.id)
        checkpoints = []
        for step, path, metrics in run.checkpoints[:-1]:
            target = copy_tree(path, job_dir / "checkpoints" / path.name)
            row = lifecycle.record_checkpoint(session=session, settings=settings, job_id=job.id, attempt=0,
                                              owner=owner, step=step, metrics=metrics, adapter_dir=target)
            assert row is not None
            checkpoints.append(row.model_id)
        final = copy_tree(run.final[1], job_dir / "adapter")
        model = lifecycle.complete_job(session=session, settings=settings, job_id=job.id, attempt=0, owner=owner,
                                       adapter_dir=final, trained_tokens=1234)
    assert model is not None
    return FineTune(job.id, model, checkpoints, key)


@pytest.fixture(scope="session")
def fine_tune(backend: Backend, trained_run: TrainedRun) -> FineTune:
    return make_fine_tune(backend, trained_run, backend.user_key)


def pytest_configure(config: pytest.Config) -> None:
    # kombu's SQLAlchemy transport (the embedded broker) uses an option SQLAlchemy 2.1 deprecates; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy is deprecated")
