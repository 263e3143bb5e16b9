"""A full disk under the database (issue 15). The embedded mode: the API on SQLite in a data dir that is a small tmpfs
of its own, filled up, so a commit fails with SQLite's own SQLITE_FULL ("database or disk is full"). A write is
answered 507 `storage_full` with Retry-After (not 503 `database_unavailable`), a read is still served, and writes work
again once there is room. PostgreSQL's disk_full the same, with a table in a tablespace on a full tmpfs."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from sqlalchemy import text

from tests.app.conftest import PG_ADMIN_URL, TINY, Backend, _link_models, chat_rows, jsonl, served_app, upload
from tests.small_disk import fill, fill_database, small_disk, sqlite_file


@pytest.fixture
def small_backend(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Backend]:
    """The embedded mode (SQLite and its broker in the data dir) with the whole data dir on a 16 MB tmpfs."""
    with small_disk(tmp_path / "data", "16m") as data_dir:
        _link_models(data_dir, tiny_model_dir, {})
        admin_key = "sk-test-admin-" + secrets.token_hex(8)
        overrides = {"data_dir": data_dir, "api_key": admin_key, "event_poll_interval_s": 0.1}
        with served_app("sqlite", "full", overrides) as (settings, ctx, url, user_key, other_key):
            yield Backend("sqlite", settings, ctx, url, admin_key, user_key, other_key)


def test_a_write_to_a_full_database_is_507_storage_full_and_reads_are_still_served(small_backend: Backend) -> None:
    client = small_backend.client()
    training = upload(client, jsonl(chat_rows(12)))
    unused_key = small_backend.new_key()  # its first request would record its last use: a write
    filler = fill_database(sqlite_file(small_backend.settings.database_url))

    with pytest.raises(openai.APIStatusError) as e:
        client.fine_tuning.jobs.create(model=TINY, training_file=training.id)
    assert e.value.status_code == 507, e.value.response.text
    assert (e.value.code, e.value.type, e.value.param) == ("storage_full", "server_error", None)
    assert "storage is full" in e.value.message
    assert e.value.response.headers["retry-after"].isdigit()
    assert not client.fine_tuning.jobs.list().data  # nothing half-made

    assert client.files.retrieve(training.id).id == training.id
    assert TINY in [m.id for m in small_backend.client(unused_key).models.list()]  # its last use goes unrecorded

    filler.unlink()  # room again
    assert client.fine_tuning.jobs.create(model=TINY, training_file=training.id).status == "queued"


@contextlib.contextmanager
def postgres_backend(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Backend]:
    """The API on a private PostgreSQL database (dropped on the way out, before the tablespace can be)."""
    data_dir = tmp_path / "data"
    _link_models(data_dir, tiny_model_dir, {})
    admin_key = "sk-test-admin-" + secrets.token_hex(8)
    with served_app("postgresql", "full", {"data_dir": data_dir, "api_key": admin_key}) as (
            settings, ctx, url, user_key, other_key):
        yield Backend("postgresql", settings, ctx, url, admin_key, user_key, other_key)


@contextlib.contextmanager
def small_tablespace() -> Iterator[tuple[str, Path]]:
    """A PostgreSQL tablespace on a 1 MB tmpfs of its own: (its name, its directory). The server must run here, as
    the `postgres` user; the directory is in the system's temp dir, whose parents that user can traverse."""
    try:
        server_user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user here: the PostgreSQL server cannot be given a directory of this machine")
    name = "small_" + secrets.token_hex(4)
    directory = Path(tempfile.mkdtemp(prefix="unsloth-tablespace-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(directory.rmdir)
        cleanup.enter_context(small_disk(directory, "1m"))
        os.chown(directory, server_user.pw_uid, server_user.pw_gid)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            try:
                conn.execute(f"CREATE TABLESPACE {name} LOCATION '{directory}'")
            except psycopg.Error as e:
                pytest.skip(f"the PostgreSQL server cannot use {directory} ({e}): it does not run on this machine")
        try:
            yield name, directory
        finally:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f"DROP TABLESPACE IF EXISTS {name}")


def test_a_write_to_a_full_postgresql_disk_is_507_storage_full(tmp_path: Path, tiny_model_dir: Path) -> None:
    """PostgreSQL's disk_full (SQLSTATE 53100, "could not extend file"): the jobs table moved to a full tablespace."""
    with small_tablespace() as (tablespace, directory), postgres_backend(tmp_path, tiny_model_dir) as backend:
        client = backend.client()
        training = upload(client, jsonl(chat_rows(12)))
        with backend.ctx.engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE jobs SET TABLESPACE {tablespace}"))  # empty: its first row extends it
        filler = fill(directory)
        with pytest.raises(openai.APIStatusError) as e:
            client.fine_tuning.jobs.create(model=TINY, training_file=training.id)
        assert e.value.status_code == 507, e.value.response.text
        assert (e.value.code, e.value.type) == ("storage_full", "server_error")
        filler.unlink()
        assert client.fine_tuning.jobs.create(model=TINY, training_file=training.id).status == "queued"


def test_the_openapi_document_declares_507_where_a_write_can_meet_a_full_disk(backend: Backend) -> None:
    paths = httpx.get(f"{backend.base_url}/openapi.json").json()["paths"]
    declared = {f"{method.upper()} {path}" for path, operations in paths.items()
                for method, operation in operations.items() if "507" in operation["responses"]}
    writes = {"POST /v1/files", "DELETE /v1/files/{file_id}", "POST /v1/fine_tuning/jobs",
              "POST /v1/fine_tuning/jobs/{job_id}/resume", "DELETE /v1/models/{model_id}", "GET /v1/models",
              "GET /v1/models/{model_id}", "POST /v1/completions", "POST /v1/chat/completions"}
    assert writes <= declared
    assert not {"GET /v1/files", "GET /v1/fine_tuning/jobs/{job_id}/events", "GET /health", "GET /ready"} & declared
    response = paths["/v1/fine_tuning/jobs"]["post"]["responses"]["507"]
    assert response["headers"]["Retry-After"]["required"]
    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
