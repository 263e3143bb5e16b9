"""Alembic, driven from code: the API (embedded mode), the `unsloth keys` command and tests upgrade with these."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.core.config import Settings, SettingsError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def ensure_schema(settings: Settings, engine: Engine) -> None:
    """Migrate (SQLite by default) or check that the schema is current. Raises SettingsError with one line when the
    database is unreachable or behind."""
    url = engine.url.render_as_string(hide_password=True)
    try:
        if settings.should_migrate:
            upgrade(settings.database_url)
            return
        current, head = current_revision(engine), head_revision()
    except SQLAlchemyError as e:
        raise SettingsError(f"cannot use the database at {url} (UNSLOTH_DATABASE_URL): {reason(e)}") from None
    if current != head:
        raise SettingsError(f"the database at {url} is at schema revision {current}, not {head}: run "
                            "`alembic upgrade head` (the compose file's `migrate` service does)")


def reason(error: SQLAlchemyError) -> str:
    """The driver's first line, without SQLAlchemy's wrapping."""
    return str(getattr(error, "orig", error)).strip().splitlines()[0] if str(error) else type(error).__name__
