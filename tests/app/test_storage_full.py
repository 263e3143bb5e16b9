"""A full disk under the embedded mode's database (issue 15): the API on SQLite in a data dir that is a small tmpfs of
its own, filled up, so a commit fails with SQLite's own SQLITE_FULL ("database or disk is full"). A write is answered
507 `storage_full` with Retry-After (never a 500), a read is still served, and writes work again once there is room."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.app.conftest import TINY, Backend, _link_models, chat_rows, jsonl, served_app, upload
from tests.small_disk import fill_database, small_disk, sqlite_file


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
