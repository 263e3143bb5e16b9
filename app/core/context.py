"""Everything a running API holds, built once from settings: the database engine and sessions, the broker, the
inference engine and the metrics. Kept on `app.state.ctx`; there are no module-level globals, so tests can run two
apps (SQLite and PostgreSQL) in one process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.core.broker import Broker
from app.core.config import Settings, SettingsError
from app.core.fair_share import FairShare
from app.core.metrics import Metrics
from app.core.probes import CachedProbe
from app.db import migrate
from app.db.session import make_engine, make_session_factory
from app.inference.engine import InferenceEngine

log = logging.getLogger("app")


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    broker: Broker
    metrics: Metrics
    inference: InferenceEngine
    fair_share: FairShare
    embedded_key: str | None = None
    readiness: CachedProbe[list[str]] | None = None  # what is not ready (empty: ready), reused `probe_cache_s`

    @classmethod
    def build(cls, settings: Settings) -> AppContext:
        engine = make_engine(settings.database_url)
        metrics = Metrics()
        ctx = cls(settings=settings, engine=engine, sessions=make_session_factory(engine), broker=Broker(settings),
                  metrics=metrics, inference=InferenceEngine(settings, metrics),
                  fair_share=FairShare(settings.max_requests_in_flight_per_key, settings.max_queued_requests_per_key))
        ttl = settings.probe_cache_s
        ctx.readiness = CachedProbe(ctx.unready, ttl)
        metrics.add_scrape_sources(CachedProbe(ctx.jobs_by_status, ttl),
                                   CachedProbe(lambda: ctx.broker.queue_depth(), ttl))
        return ctx

    def unready(self) -> list[str]:
        """What does not answer now: the database, the broker (each named with its error's type)."""
        problems = []
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as e:
            problems.append(f"database: {type(e).__name__}")
        try:
            self.broker.ping()
        except Exception as e:
            problems.append(f"broker: {type(e).__name__}")
        return problems

    def prepare_database(self) -> None:
        """Migrate (SQLite by default) or check the schema is current; then the admin keys and the base models.
        Raises SettingsError with one line when the database is unreachable or behind."""
        from app.services.keys import bootstrap_keys
        from app.services.models import sync_base_models

        migrate.ensure_schema(self.settings, self.engine)
        try:
            with self.sessions() as session:
                self.embedded_key = bootstrap_keys(session=session, settings=self.settings)
                sync_base_models(session=session, settings=self.settings)
        except SQLAlchemyError as e:
            url = self.engine.url.render_as_string(hide_password=True)
            raise SettingsError(f"cannot use the database at {url} (UNSLOTH_DATABASE_URL): "
                                f"{migrate.reason(e)}") from None

    def jobs_by_status(self) -> dict[str, int]:
        from app.services.jobs import jobs_by_status

        with self.sessions() as session:
            return jobs_by_status(session)

    def close(self) -> None:
        self.inference.shutdown()
        self.broker.close()
        self.engine.dispose()
