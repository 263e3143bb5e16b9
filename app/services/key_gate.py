"""Which API key a bearer token is, answered before a request's body is read (app/core/middleware.py).

The route's own dependency still authenticates every request against the database; this only decides whether the
body may be read at all, so an unauthenticated client cannot make the API parse 16 MiB of JSON, and names the key
whose request rate is counted (app/core/rate_limit.py). Known-good tokens are remembered for a few seconds (a revoked
key may still send a body for that long; the route refuses it); unknown ones are never remembered, so each costs one
indexed lookup, far less than the body it would have sent.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.security import hash_key
from app.db.models import ApiKey


class KeyGate:
    def __init__(self, sessions: sessionmaker[Session], ttl_s: float = 5.0, size: int = 4096) -> None:
        self.sessions, self.ttl_s, self.size = sessions, ttl_s, size
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key hash -> (key id, when found live)
        self._lock = threading.Lock()

    def remembered(self, token: str) -> str | None:
        """The key's id if `token` was found live less than `ttl_s` ago, else None; never waits on the database,
        so the event loop may ask (a busy key's requests then take no worker thread to be let in)."""
        digest = hash_key(token)
        with self._lock:
            known = self._known.get(digest)
            if known is not None and time.monotonic() - known[1] < self.ttl_s:
                return known[0]
        return None

    def identify(self, token: str) -> str | None:
        """The id of the live key `token` is, or None (unknown or revoked)."""
        key_id = self.remembered(token)
        if key_id is not None:
            return key_id
        digest = hash_key(token)
        now = time.monotonic()
        with self.sessions() as session:
            key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
                                    .limit(1))
        with self._lock:
            if key_id is not None:
                self._known[digest] = (key_id, now)
                self._known.move_to_end(digest)
                while len(self._known) > self.size:
                    self._known.popitem(last=False)
            else:
                self._known.pop(digest, None)
        return key_id

    def allows(self, token: str) -> bool:
        return self.identify(token) is not None
