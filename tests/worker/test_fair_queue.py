"""The training queue is fair across API keys (issue 15): a key with many queued jobs delays another key's first job
by at most one job's turn. On its own database, rows as the API and the worker write them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import Base, utcnow
from app.db.models import ApiKey, Job
from app.db.session import make_engine, make_session_factory
from app.services import fair_queue
from worker import training


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fair.db'}")
    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)
    with factory() as session:
        session.add_all([ApiKey(id=k, name=k, prefix="sk-", key_hash=k, is_admin=False, source="cli")
                         for k in ("key-a", "key-b")])
        session.commit()
    yield factory
    engine.dispose()


def add(session: Session, job_id: str, owner: str, minute: int, status: str = "queued") -> None:
    at = utcnow() - timedelta(hours=1) + timedelta(minutes=minute)
    session.add(Job(id=job_id, owner_id=owner, model="m", training_file="f", seed=0, method={}, request_hash="x",
                    status=status, created_at=at, started_at=at if status != "queued" else None))


def test_a_key_with_many_queued_jobs_lets_another_keys_first_job_go_next(
        sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        add(s, "ftjob-a0", "key-a", 0, status="running")  # key A has had its turn
        for i in range(1, 6):
            add(s, f"ftjob-a{i}", "key-a", i)
        add(s, "ftjob-b1", "key-b", 10)  # queued after all of A's
        s.commit()
        assert fair_queue.pick(s, "ftjob-a1", 0) == ("ftjob-b1", 0)  # A's next message: B's turn
        assert fair_queue.pick(s, "ftjob-b1", 0) == ("ftjob-b1", 0)
        s.get(Job, "ftjob-b1").status, s.get(Job, "ftjob-b1").started_at = "running", utcnow()  # type: ignore[union-attr]
        s.commit()
        assert fair_queue.pick(s, "ftjob-a1", 0) == ("ftjob-a1", 0)  # B has had its turn: A's again
        assert fair_queue.pick(s, "ftjob-a2", 1) == ("ftjob-a2", 1)  # a stale message is left to be dropped


def test_a_key_alone_runs_in_message_order(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        add(s, "ftjob-a0", "key-a", 0, status="succeeded")
        for i in (1, 2, 3):
            add(s, f"ftjob-a{i}", "key-a", i)
        s.commit()
        assert [fair_queue.pick(s, f"ftjob-a{i}", 0)[0] for i in (3, 1, 2)] == ["ftjob-a3", "ftjob-a1", "ftjob-a2"]


def test_a_worker_that_gives_the_turn_away_sends_the_message_again(sessions: sessionmaker[Session],
                                                                  tmp_path: Path) -> None:
    from app.core.config import load_settings

    sent: list[tuple[str, int]] = []

    class Broker:
        settings = load_settings(data_dir=tmp_path)

        def send_train(self, job_id: str, attempt: int) -> None:
            sent.append((job_id, attempt))

    class Ctx:
        def __init__(self) -> None:
            self.sessions, self.broker = sessions, Broker()

    with sessions() as s:
        add(s, "ftjob-a0", "key-a", 0, status="running")
        add(s, "ftjob-a1", "key-a", 1)
        add(s, "ftjob-b1", "key-b", 2)
        s.commit()
    ctx: Any = Ctx()
    assert training.take_turn(ctx, "ftjob-a1", 0) == ("ftjob-b1", 0)
    assert sent == [("ftjob-a1", 0)]  # A's job keeps a message: it runs on a later turn
    with sessions() as s:
        job = s.get(Job, "ftjob-a1")
        assert job is not None and job.status == "queued" and job.send_count == 1
