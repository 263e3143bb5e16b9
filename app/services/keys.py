"""API keys: create, list, revoke, authenticate; the admin keys from `UNSLOTH_API_KEY` and the embedded mode; the
admin API's view of them (`/v1/organization/admin_api_keys`). A key's plaintext is returned once, when it is made,
and never logged or stored: only its SHA-256 is."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.core import ids
from app.core.config import Settings
from app.core.disk_full import is_storage_full
from app.core.errors import APIError, bad_request, not_found
from app.core.security import generate_key, hash_key, shown_prefix
from app.db.base import unix, utcnow
from app.db.models import ApiKey
from app.schemas.admin_keys import AdminApiKey, AdminApiKeyCreated, AdminApiKeyList, AdminApiKeyOwner
from app.services.common import page

log = logging.getLogger("app.keys")

LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write on every request


def create_key(*, session: Session, name: str, is_admin: bool = False, source: str = "cli",
               key: str | None = None) -> tuple[ApiKey, str]:
    """A new key; returns the row and the plaintext, which is never stored and cannot be shown again."""
    key = key or generate_key()
    row = ApiKey(id=ids.new_id(ids.KEY), name=name, prefix=shown_prefix(key), key_hash=hash_key(key),
                 is_admin=is_admin, source=source)
    session.add(row)
    session.commit()
    return row, key


def list_keys(*, session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(*, session: Session, key_id: str) -> ApiKey | None:
    """Revoke by id (`key_...`) or by the shown prefix (`sk-unsloth-xxxxxx`) when that is unambiguous."""
    rows = list(session.scalars(select(ApiKey).where(or_(ApiKey.id == key_id, ApiKey.prefix == key_id),
                                                     ApiKey.revoked_at.is_(None))))
    if len(rows) != 1:
        return None
    rows[0].revoked_at = utcnow()
    session.commit()
    return rows[0]


def authenticate(*, session: Session, token: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
        try:
            session.commit()
        except OperationalError as e:
            if not is_storage_full(e):
                raise
            session.rollback()  # a full disk costs the stamp, not the request: a read is still served
    return row


def ensure_admin_key(*, session: Session, key: str, source: str) -> ApiKey:
    """Make `key` a working admin key: the row for this source is created, or re-pointed at the new key's hash,
    so a changed `UNSLOTH_API_KEY` keeps owning what the old one created."""
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.source == source, ApiKey.is_admin.is_(True))
                         .order_by(ApiKey.id).limit(1))
    if row is None:
        row, _ = create_key(session=session, name=f"admin ({source})", is_admin=True, source=source, key=key)
        return row
    if row.key_hash == digest:
        if row.revoked_at is not None:  # revoked on purpose: a restart with the same key must not undo that
            log.warning("the %s admin key (%s...) was revoked and stays revoked; set a new key to replace it",
                        source, row.prefix)
        return row
    row.key_hash, row.prefix, row.revoked_at = digest, shown_prefix(key), None  # a new key: rotated
    session.commit()
    return row


def embedded_key(settings: Settings) -> tuple[str, bool]:
    """The embedded mode's admin key, kept in `<data dir>/api_key` (mode 0600); (key, True) when just made."""
    path = settings.api_key_file
    if path.is_file():
        return path.read_text().strip(), False
    key = generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True


def bootstrap_keys(*, session: Session, settings: Settings) -> str | None:
    """At start: `UNSLOTH_API_KEY` as an admin key; in the embedded mode without one, the generated key (printed the
    first time). Returns the embedded key when one is in use."""
    if settings.api_key is not None:
        ensure_admin_key(session=session, key=settings.api_key.get_secret_value(), source="env")
        return None
    if not settings.embedded:
        if not list_keys(session=session):
            log.warning("no API key exists: set UNSLOTH_API_KEY or run `unsloth keys create`")
        return None
    key, created = embedded_key(settings)
    ensure_admin_key(session=session, key=key, source="embedded")
    if created:  # the key itself goes to the operator's terminal only (app/main.py), never to a log
        log.warning("generated an API key, kept in %s (readable by this user only)", settings.api_key_file)
    return key


# ---- the admin API: /v1/organization/admin_api_keys ----


def check_admin(key: ApiKey) -> ApiKey:
    if not key.is_admin:
        raise APIError(403, "You have insufficient permissions for this operation: API keys are managed with an "
                            "admin key.", type="permission_error", code="insufficient_permissions")
    return key


def get_key(*, session: Session, key_id: str) -> ApiKey:
    """A live key by id; a revoked one is gone, as a deleted key is at OpenAI (404)."""
    row = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)))
    if row is None:
        raise not_found("API key", key_id, param="key_id", code="api_key_not_found")
    return row


def list_key_objects(*, session: Session, after: str | None, limit: int) -> AdminApiKeyList:
    """Live keys, oldest first (OpenAI's default order), paged with `after`."""
    rows, more = page(session, select(ApiKey).where(ApiKey.revoked_at.is_(None)), ApiKey.id, after=after,
                      limit=limit, descending=False)
    data = [key_object(r) for r in rows]
    return AdminApiKeyList(data=data, has_more=more, first_id=data[0].id if data else None,
                           last_id=data[-1].id if data else None)


def create_key_object(*, session: Session, caller: ApiKey, name: str, is_admin: bool) -> AdminApiKeyCreated:
    row, value = create_key(session=session, name=name, is_admin=is_admin, source="api")
    log.info("API key %s%s created by %s", row.id, " (admin)" if is_admin else "", caller.id)  # ids only
    return AdminApiKeyCreated(**key_object(row).model_dump(), value=value)


def revoke_key_by_id(*, session: Session, caller: ApiKey, key_id: str) -> ApiKey:
    """Revoke at once: every request authenticates against the database (app/api/deps.py), so the key's next one
    is a 401. The calling key cannot revoke itself (that would lock its holder out mid-request)."""
    row = get_key(session=session, key_id=key_id)
    if row.id == caller.id:
        raise bad_request("An API key cannot revoke itself: revoke it with another admin key (or `unsloth keys "
                          "revoke`).", param="key_id", code="cannot_revoke_own_key")
    row.revoked_at = utcnow()
    session.commit()
    log.info("API key %s revoked by %s", row.id, caller.id)
    return row


def key_object(row: ApiKey) -> AdminApiKey:
    created = unix(row.created_at) or 0
    owner = AdminApiKeyOwner(id=row.id, name=row.name, created_at=created, role="owner" if row.is_admin else "member")
    return AdminApiKey(id=row.id, name=row.name, redacted_value=f"{row.prefix}...", created_at=created,
                       last_used_at=unix(row.last_used_at), owner=owner, admin=row.is_admin)
