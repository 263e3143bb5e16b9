"""Bearer keys (401 + WWW-Authenticate, revoked keys, the admin key, the `keys` command) and the error envelope on
every non-2xx: unknown routes, wrong methods, validation, oversized bodies, unexpected errors."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import openai
import pytest

from app.cli import keys_main
from tests.app.conftest import TINY, Backend

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def get(backend: Backend, path: str, key: str | None = None, method: str = "GET", **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.request(method, backend.base_url + path, headers=headers, timeout=30, **kwargs)


@pytest.mark.parametrize("key", [None, "sk-unsloth-wrong"])
def test_an_unauthenticated_body_is_never_read(backend: Backend, key: str | None) -> None:
    """Issue 15: FastAPI parses a JSON body before the route's key check, so anyone could make the API parse
    16 MiB on its event loop. The 401 now comes back while the body is still unsent: the request below declares
    16 MB and sends 2 bytes, so an answer at all shows the server never waited for the body."""
    host, port = backend.base_url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: 16000000\r\n\r\n{{\"").encode()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)  # a server waiting for the body times this out: the test fails
            assert chunk, "the server closed the connection without an answer"
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"401"
    assert b"connection: close" in rest.lower() and b"www-authenticate: bearer" in rest.lower()


@pytest.mark.parametrize("path", ["/v1/models", "/v1/files", "/v1/fine_tuning/jobs", "/v1/models/tiny-chat"])
def test_missing_or_wrong_key_is_401(backend: Backend, path: str) -> None:
    for key in (None, "sk-unsloth-wrong"):
        r = get(backend, path, key)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"].keys() == ENVELOPE_KEYS and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(backend.base_url + path, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError) as e:
        backend.client("sk-unsloth-wrong").models.list()
    assert e.value.code == "invalid_api_key"


def test_keys_command_creates_lists_and_revokes(backend: Backend, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    s = backend.settings
    env = {"UNSLOTH_DATA_DIR": str(s.data_dir), "UNSLOTH_DATABASE_URL": s.database_url,
           "UNSLOTH_BROKER_URL": s.broker_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert keys_main(["create", "--name", "from-cli"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-unsloth-")
    assert backend.client(key).models.list().data
    assert keys_main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "from-cli" in listing and key not in listing and key[:17] in listing  # only the prefix is shown
    key_id = next(line.split("\t")[0] for line in listing.splitlines() if "from-cli" in line)
    assert keys_main(["revoke", key_id]) == 0
    with pytest.raises(openai.AuthenticationError):
        backend.client(key).models.list()
    assert keys_main(["revoke", key_id]) == 1


def test_unknown_route_and_wrong_method_use_the_envelope(backend: Backend) -> None:
    r = get(backend, "/v1/nope", backend.user_key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = get(backend, "/v1/fine_tuning/jobs", backend.user_key, method="DELETE")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "GET, POST"
    r = get(backend, "/health", method="POST")
    assert r.status_code == 405 and r.json()["error"].keys() == ENVELOPE_KEYS


def test_bad_bodies_are_400_with_param(backend: Backend) -> None:
    r = get(backend, "/v1/chat/completions", backend.user_key, method="POST", content=b"{not json",
            headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = get(backend, "/v1/chat/completions", backend.user_key, method="POST",
            json={"model": TINY, "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = get(backend, "/v1/fine_tuning/jobs?limit=0", backend.user_key)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    with pytest.raises(openai.BadRequestError) as e:
        backend.client().chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}], n=0)
    assert e.value.param == "n"


def test_oversized_body_is_413(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend.settings, "max_request_bytes", 2048)
    with pytest.raises(openai.APIStatusError) as e:
        backend.client().chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x" * 5000}])
    assert e.value.status_code == 413 and e.value.code == "request_too_large"


def test_unexpected_errors_are_500_without_details(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.services import models

    def broken(**_: Any) -> Any:
        raise RuntimeError("secret internals at /srv/data")

    monkeypatch.setattr(models, "list_models", broken)
    r = get(backend, "/v1/models", backend.user_key)
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "The server had an error while processing your request.",
                                  "type": "server_error", "param": None, "code": "internal_error"}}


def test_the_key_gate_remembers_live_keys_briefly_and_never_unknown_ones(backend: Backend) -> None:
    from app.services import keys
    from app.services.key_gate import KeyGate

    gate, lookups = KeyGate(backend.ctx.sessions, ttl_s=3600), []
    real_sessions = gate.sessions
    gate.sessions = lambda: (lookups.append(1), real_sessions())[1]  # type: ignore[assignment,method-assign]
    key = backend.new_key("gate")
    assert gate.allows(key) and gate.allows(key) and len(lookups) == 1  # the second answer came from memory
    assert not gate.allows("sk-unsloth-nope") and not gate.allows("sk-unsloth-nope") and len(lookups) == 3
    with backend.ctx.sessions() as session:
        row = keys.authenticate(session=session, token=key)
        assert row is not None
        keys.revoke_key(session=session, key_id=row.id)
    gate.ttl_s = 0  # past its time: the revocation is seen
    assert not gate.allows(key)


def test_a_revoked_environment_admin_key_stays_revoked_across_restarts(backend: Backend) -> None:
    """Issue 15: a restart re-activated a revoked `UNSLOTH_API_KEY`. Now the same key stays revoked; a new key
    in the variable replaces it (rotation), and the old one stays dead."""
    import secrets

    from app.services import keys

    old, new = (f"sk-unsloth-env-{secrets.token_hex(8)}" for _ in range(2))
    source = f"env-{secrets.token_hex(2)}"
    with backend.ctx.sessions() as session:
        row = keys.ensure_admin_key(session=session, key=old, source=source)
        assert keys.revoke_key(session=session, key_id=row.id) is not None
        keys.ensure_admin_key(session=session, key=old, source=source)  # a restart with the same variable
        assert keys.authenticate(session=session, token=old) is None
        keys.ensure_admin_key(session=session, key=new, source=source)  # the operator set a new key
        assert keys.authenticate(session=session, token=new) is not None
        assert keys.authenticate(session=session, token=old) is None

