"""`/v1/organization/admin_api_keys` (issue 20): admin keys list, create, retrieve and revoke API keys, over the real
app on both backends through the openai SDK's raw methods. The secret comes back once, is stored hashed, is never
logged; a revoked key is refused on its next request; a key cannot revoke itself; any other key gets 403.

Tests revoke only keys they made: the backend's admin and user keys are shared by the whole session."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from app.core.rate_limit import route_family
from app.db.models import ApiKey
from tests.app.conftest import Backend

PATH = "/organization/admin_api_keys"


def admin(backend: Backend) -> openai.OpenAI:
    return backend.client(backend.admin_key)


def create(client: openai.OpenAI, name: str, **body: Any) -> httpx.Response:
    return client.post(PATH, body={"name": name, **body}, cast_to=httpx.Response)


def get_json(client: openai.OpenAI, path: str) -> Any:
    return client.get(path, cast_to=httpx.Response).json()


def test_create_use_list_retrieve_and_revoke(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = admin(backend)
    r = create(client, "ci runner")
    assert r.headers["cache-control"] == "no-store"
    made = r.json()
    value = made["value"]
    assert value.startswith("sk-unsloth-") and made["redacted_value"] == value[:17] + "..."
    assert made["object"] == "organization.admin_api_key" and made["name"] == "ci runner"
    assert made["admin"] is False and made["last_used_at"] is None and made["created_at"] > 0
    assert made["owner"] == {"type": "service_account", "object": "organization.service_account", "id": made["id"],
                             "name": "ci runner", "created_at": made["created_at"], "role": "member"}

    assert backend.client(value).models.list().data  # the new key works at once
    shown = get_json(client, f"{PATH}/{made['id']}")
    assert "value" not in shown and shown["redacted_value"] == made["redacted_value"]
    assert shown["last_used_at"] is not None  # stamped by that request
    listed = get_json(client, f"{PATH}?limit=100")
    assert listed["object"] == "list" and made["id"] in [k["id"] for k in listed["data"]]
    assert all("value" not in k for k in listed["data"])

    gone = client.delete(f"{PATH}/{made['id']}", cast_to=httpx.Response).json()
    assert gone == {"id": made["id"], "object": "organization.admin_api_key.deleted", "deleted": True}
    # At once: the next request is refused, a read or a write whose body the key gate may still let in.
    with pytest.raises(openai.AuthenticationError):
        backend.client(value).models.list()
    with pytest.raises(openai.AuthenticationError):
        backend.client(value).files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError) as e:
        client.get(f"{PATH}/{made['id']}", cast_to=httpx.Response)
    assert e.value.code == "api_key_not_found"
    with pytest.raises(openai.NotFoundError):
        client.delete(f"{PATH}/{made['id']}", cast_to=httpx.Response)
    assert made["id"] not in [k["id"] for k in get_json(client, f"{PATH}?limit=100")["data"]]

    with backend.ctx.sessions() as session:  # stored as its SHA-256 only, as `unsloth keys create` does
        row = session.scalar(select(ApiKey).where(ApiKey.id == made["id"]))
        assert row is not None and row.key_hash == hashlib.sha256(value.encode()).hexdigest()
        assert row.source == "api" and row.revoked_at is not None
        assert value not in repr([getattr(row, c.key) for c in ApiKey.__table__.columns])
    # The server's log (this process: the app runs on a thread) names the key's id, never the key; the SDK's own
    # debug lines, on this side of the wire, are left out.
    server_log = "\n".join(r.getMessage() for r in caplog.records
                           if not r.name.startswith(("openai", "httpx", "httpcore")))
    assert made["id"] in server_log and value not in server_log


def test_only_an_admin_key_may_manage_keys(backend: Backend) -> None:
    user = backend.client(backend.user_key)
    for call in (lambda: user.get(PATH, cast_to=httpx.Response),
                 lambda: create(user, "mine"),
                 lambda: user.get(f"{PATH}/key_x", cast_to=httpx.Response),
                 lambda: user.delete(f"{PATH}/key_x", cast_to=httpx.Response)):
        with pytest.raises(openai.PermissionDeniedError) as e:
            call()
        assert e.value.status_code == 403 and e.value.code == "insufficient_permissions"
        body = e.value.body
        assert isinstance(body, dict) and body.keys() == {"message", "type", "param", "code"}
        assert body["type"] == "permission_error" and body["param"] is None
    with pytest.raises(openai.AuthenticationError):  # no key at all: 401 before 403
        backend.client("sk-unsloth-wrong").get(PATH, cast_to=httpx.Response)

    client = admin(backend)
    member = create(client, "member").json()
    with pytest.raises(openai.PermissionDeniedError):  # a key made over the API is a plain key unless asked
        backend.client(member["value"]).get(PATH, cast_to=httpx.Response)
    second = create(client, "second admin", admin=True).json()
    assert second["admin"] is True and second["owner"]["role"] == "owner"
    other_admin = backend.client(second["value"])
    assert member["id"] in [k["id"] for k in get_json(other_admin, f"{PATH}?limit=100")["data"]]
    other_admin.delete(f"{PATH}/{member['id']}", cast_to=httpx.Response)
    client.delete(f"{PATH}/{second['id']}", cast_to=httpx.Response)
    with pytest.raises(openai.AuthenticationError):
        other_admin.get(PATH, cast_to=httpx.Response)


def test_an_admin_key_cannot_revoke_itself(backend: Backend) -> None:
    made = create(admin(backend), "self", admin=True).json()
    own = backend.client(made["value"])
    with pytest.raises(openai.BadRequestError) as e:
        own.delete(f"{PATH}/{made['id']}", cast_to=httpx.Response)
    assert e.value.code == "cannot_revoke_own_key" and e.value.param == "key_id"
    assert "cannot revoke itself" in e.value.message
    assert get_json(own, f"{PATH}/{made['id']}")["id"] == made["id"]  # still live
    admin(backend).delete(f"{PATH}/{made['id']}", cast_to=httpx.Response)


def test_list_pages_oldest_first_without_revoked_keys(backend: Backend) -> None:
    client = admin(backend)
    first, second, third = (create(client, f"page {i}").json()["id"] for i in range(3))
    page = get_json(client, f"{PATH}?after={first}&limit=1")
    assert [k["id"] for k in page["data"]] == [second] and page["has_more"] is True
    assert page["first_id"] == page["last_id"] == second
    page = get_json(client, f"{PATH}?after={second}&limit=5")
    assert [k["id"] for k in page["data"]] == [third] and page["has_more"] is False
    client.delete(f"{PATH}/{second}", cast_to=httpx.Response)
    assert [k["id"] for k in get_json(client, f"{PATH}?after={first}&limit=5")["data"]] == [third]
    for key_id in (first, third):
        client.delete(f"{PATH}/{key_id}", cast_to=httpx.Response)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({}, "name", "missing_required_parameter"),
    ({"name": ""}, "name", None),
    ({"name": "x" * 129}, "name", None),
    ({"name": "tab\there"}, "name", None),
    ({"name": "ok", "admin": "yes"}, "admin", None),
    ({"name": "ok", "scopes": ["all"]}, "scopes", "unknown_parameter"),
])
def test_create_refuses_bad_bodies(backend: Backend, body: dict[str, Any], param: str, code: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        admin(backend).post(PATH, body=body, cast_to=httpx.Response)
    assert e.value.param == param
    if code:
        assert e.value.code == code


def test_counted_with_the_models_family(backend: Backend) -> None:
    assert route_family("/v1/organization/admin_api_keys/key_1") == "models"
    r = admin(backend).get(PATH, cast_to=httpx.Response)
    assert r.headers["x-ratelimit-limit-requests"] == str(backend.settings.rpm_models)


def test_the_openapi_document_declares_the_403(backend: Backend) -> None:
    paths = httpx.get(f"{backend.base_url}/openapi.json").json()["paths"]
    operations = {**paths["/v1" + PATH], **paths["/v1" + PATH + "/{key_id}"]}
    assert sorted(operations) == ["delete", "get", "post"]
    for path in (PATH, PATH + "/{key_id}"):
        for method, operation in paths["/v1" + path].items():
            assert {"401", "403"} <= operation["responses"].keys(), (method, path)
