"""Alembic on both databases: upgrade, the schema equals the models (nothing for autogenerate to add), downgrade to
nothing, upgrade again."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from app.db import migrate
from app.db.base import Base
from app.db.session import make_engine
from tests.app.conftest import PG_ADMIN_URL

TABLES = {"api_keys", "files", "jobs", "job_events", "checkpoints", "models", "exports"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    name = f"unsloth_migrations_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_matches_models_then_downgrade_and_upgrade(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(database_url)
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        migrate.downgrade(database_url, "base")
        engine.dispose()
        assert not TABLES & set(inspect(engine).get_table_names())
        migrate.upgrade(database_url)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_files_stored_before_0002_get_their_summaries(database_url: str) -> None:
    """0002 adds `validation_summary` and fills it from each stored report (its errors left out), so lists of files
    uploaded before it still show counts."""
    from sqlalchemy import text

    engine = make_engine(database_url)
    try:
        migrate.upgrade(database_url, "0001")
        value = ":v" if database_url.startswith("sqlite") else "CAST(:v AS JSONB)"
        report = ('{"ok": false, "n_errors": 2, "error_counts": {"invalid_json": 2}, '
                  '"errors": [{"line": 1, "code": "invalid_json", "message": "x"}]}')
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (id, name, prefix, key_hash, is_admin, source, created_at) "
                              "VALUES ('k1', 'k', 'sk-', 'h', false, 'cli', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO files (id, owner_id, filename, purpose, bytes, status, validation, path, "
                              "sha256, created_at) VALUES ('file-1', 'k1', 'a.jsonl', 'fine-tune', 3, 'error', "
                              f"{value}, 'files/file-1.jsonl', 'x', CURRENT_TIMESTAMP)"), {"v": report})
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            summary = conn.execute(text("SELECT validation_summary FROM files")).scalar_one()
        if isinstance(summary, str):  # SQLite hands JSON back as text
            import json

            summary = json.loads(summary)
        assert summary == {"ok": False, "n_errors": 2, "error_counts": {"invalid_json": 2}}
    finally:
        engine.dispose()


def test_a_file_row_holds_a_size_past_2_gib(database_url: str) -> None:
    """0004: an exported GGUF is gigabytes; PostgreSQL's INTEGER stopped at 2 GiB (SQLite's is 64-bit already)."""
    from sqlalchemy import text

    engine = make_engine(database_url)
    try:
        migrate.upgrade(database_url)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (id, name, prefix, key_hash, is_admin, source, created_at) "
                              "VALUES ('k1', 'k', 'sk-', 'h', false, 'cli', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO files (id, owner_id, filename, purpose, bytes, status, path, sha256, "
                              "created_at) VALUES ('file-1', 'k1', 'model.F16.gguf', 'export', :n, 'processed', "
                              "'exports/e/attempt-0/gguf/model.F16.gguf', 'x', CURRENT_TIMESTAMP)"),
                         {"n": 16 * 2**30})
        with engine.connect() as conn:
            assert conn.execute(text("SELECT bytes FROM files")).scalar_one() == 16 * 2**30
    finally:
        engine.dispose()
