"""What a worker process holds, built once per process from the settings: the database engine and sessions, and
a broker client for sending train messages. Rebuilt after a fork, so no connection is shared between processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.broker import Broker
from app.core.config import Settings, load_settings
from app.db.session import make_engine, make_session_factory


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    broker: Broker

    @classmethod
    def build(cls, settings: Settings) -> WorkerContext:
        engine = make_engine(settings.database_url)
        return cls(settings=settings, engine=engine, sessions=make_session_factory(engine), broker=Broker(settings))

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_s)

    def close(self) -> None:
        self.broker.close()
        self.engine.dispose()


_current: tuple[int, WorkerContext] | None = None
main_pid = os.getpid()  # the worker's main process (set when its app is built; pool processes inherit it)


def current() -> WorkerContext:
    """This process's context (settings from the environment, as the worker command read them)."""
    global _current
    if _current is None or _current[0] != os.getpid():
        _current = (os.getpid(), WorkerContext.build(load_settings()))
    return _current[1]
