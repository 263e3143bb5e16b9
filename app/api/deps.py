"""Typed dependencies: the app context, a database session per request, the caller's API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.context import AppContext
from app.core.errors import unauthorized
from app.db.models import ApiKey
from app.services import keys

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer sk-unsloth-...`")


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    with ctx.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_current_key(session: SessionDep,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
    if credentials is None or not credentials.credentials:
        raise unauthorized("You didn't provide an API key. Send it as a Bearer token: "
                           "'Authorization: Bearer YOUR_KEY'.")
    key = keys.authenticate(session=session, token=credentials.credentials)
    if key is None:
        raise unauthorized("Incorrect API key provided.")
    return key


CurrentKey = Annotated[ApiKey, Depends(get_current_key)]
