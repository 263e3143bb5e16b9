"""Settings (defaults, one clear line per bad value, also from the real entry point) and the embedded mode's key."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import SettingsError, load_settings
from app.core.context import AppContext
from app.main import create_app
from app.services import keys


def test_defaults_live_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("UNSLOTH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("UNSLOTH_DATA_DIR", str(tmp_path / "data"))
    s = load_settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'unsloth.db'}"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path / 'data' / 'broker.db'}"
    assert (s.host, s.port, s.embedded, s.should_migrate) == ("127.0.0.1", 8000, True, True)
    assert (tmp_path / "data" / "models").is_dir() and (tmp_path / "data" / "files").is_dir()
    pg = load_settings(data_dir=tmp_path, database_url="postgres://u:p@db:5432/x", broker_url="redis://r:6379/0")
    assert pg.database_url == "postgresql+psycopg://u:p@db:5432/x" and not pg.embedded and not pg.should_migrate


@pytest.mark.parametrize(("overrides", "message"), [
    ({"database_url": "not a url"}, "invalid setting UNSLOTH_DATABASE_URL: 'not a url' is not a database URL"),
    ({"database_url": "mysql://h/db"}, "invalid setting UNSLOTH_DATABASE_URL: database 'mysql' is not supported"),
    ({"broker_url": "kafka://h"}, "invalid setting UNSLOTH_BROKER_URL: 'kafka://h' is not a broker URL"),
    ({"port": 0}, "invalid setting UNSLOTH_PORT: Input should be greater than or equal to 1"),
    ({"data_dir": "/no/such/parent/data"}, "UNSLOTH_DATA_DIR=/no/such/parent/data: its parent directory does not"),
])
def test_bad_settings_are_one_line(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as e:
        load_settings(**overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize(("env", "expected"), [
    ({"UNSLOTH_DATABASE_URL": "nonsense"}, "unsloth: invalid setting UNSLOTH_DATABASE_URL"),
    ({"UNSLOTH_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/db"}, "unsloth: cannot use the database at"),
])
def test_the_server_refuses_to_start_with_one_line(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_")}
    environ.update(env, UNSLOTH_DATA_DIR=str(tmp_path), UNSLOTH_BROKER_URL="memory://")
    proc = subprocess.run([sys.executable, "-m", "app"], env=environ, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr


def test_embedded_mode_generates_and_keeps_a_key(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, api_key=None)
    assert settings.embedded
    ctx: AppContext = create_app(settings).state.ctx
    key = ctx.embedded_key
    assert key is not None and key.startswith("sk-unsloth-")
    assert (tmp_path / "api_key").read_text().strip() == key
    assert stat.S_IMODE((tmp_path / "api_key").stat().st_mode) == 0o600
    with ctx.sessions() as session:
        row = keys.authenticate(session=session, token=key)
        assert row is not None and row.is_admin
    ctx.close()
    again: AppContext = create_app(load_settings(data_dir=tmp_path)).state.ctx
    assert again.embedded_key == key  # kept across restarts
    again.close()


def test_the_generated_embedded_key_never_reaches_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15: the generated key was logged. It is printed on the operator's terminal by `unsloth serve`'s banner
    only; the log names the file that keeps it."""
    with caplog.at_level("DEBUG"):
        ctx: AppContext = create_app(load_settings(data_dir=tmp_path, api_key=None)).state.ctx
    key = ctx.embedded_key
    ctx.close()
    assert key and key not in caplog.text and str(tmp_path / "api_key") in caplog.text
