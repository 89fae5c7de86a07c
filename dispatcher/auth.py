"""Who may call the API: every route declares the role it needs, and one guard checks the key.

Routes say ``**requires(Role.X)`` (their ``opt["role"]``, shown in the OpenAPI document as the
``apiKey`` security requirement). The exceptions are declared as well: ``opt["public"]``
(``/healthz`` and the OpenAPI document) and ``opt["agent_auth"]`` (agent registration, which
checks the agent's token). A route that declares none of these is refused to everyone, and
:func:`check_routes` makes ``create_app`` fail on it, so no route is ever open by mistake.

Keys: the bootstrap admin key (``REXEC_API_KEY`` of ``rexec serve``) and the keys of
``rexec apikey create``, looked up by their SHA-256. 401: no key, or an unknown, revoked or
expired one; 403: a valid key whose role is not enough. Both messages name the role needed.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from litestar import Litestar, Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import Reference, SecurityScheme
from sqlalchemy.exc import SQLAlchemyError

from rexec.schemas.api import Principal, Role

from . import apikeys
from .runtime import Runtime
from .service import hash_secret

log = logging.getLogger("rexec.auth")

SCHEME = "apiKey"
"""The OpenAPI security scheme: ``Authorization: Bearer <key>``; its scopes name the role."""
SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    SCHEME: SecurityScheme(
        type="http",
        scheme="bearer",
        description="An API key: `rexec apikey create --role viewer|submitter|admin`, or the "
        "bootstrap admin key (REXEC_API_KEY of `rexec serve`). The scopes of each operation "
        "name the role it needs; admin includes submitter, submitter includes viewer.",
    )
}
PUBLIC: dict[str, Any] = {"opt": {"public": True}}
"""For the routes anyone may call: ``/healthz``, ``/readyz`` and the OpenAPI document."""
TOUCH_EVERY = 60.0
"""Seconds between writes of a key's ``last_used_at`` (not one write per request)."""
STATE_KEY = "rexec_principal"
HOW = (
    "send 'Authorization: Bearer <key>'; the CLI and client read REXEC_API_KEY, "
    "then the credentials file written by `rexec login`"
)


def requires(role: Role) -> dict[str, Any]:
    """Route keyword arguments declaring the role a route needs."""
    return {"opt": {"role": role}, "security": [{SCHEME: [role.value]}]}


def bootstrap_principal() -> Principal:
    return Principal(kind="bootstrap", id="bootstrap", name="bootstrap", role=Role.ADMIN)


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`, or refuses it."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        key = rt.settings.api_key
        self._bootstrap = hash_secret(key) if key else None
        self._touched: dict[str, float] = {}

    async def authenticate(self, authorization: str | None, role: Role) -> Principal:
        needs = f"this needs an API key with the {_role_text(role)}"
        if not authorization:
            raise NotAuthorizedException(f"missing API key: {needs}: {HOW}")
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise NotAuthorizedException(
                f"the Authorization header must be 'Bearer <API key>': {needs}"
            )
        digest = hash_secret(secret)
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap):
            return bootstrap_principal()
        key = await apikeys.lookup(self.rt, secret)
        if key is None:
            raise NotAuthorizedException(f"unknown API key: {needs}: {HOW}")
        now = time.time()
        state = apikeys.key_state(key, now)
        if state != "active":
            raise NotAuthorizedException(
                f"API key {key.prefix}… (id {key.id}) is {state}: {needs}; "
                f"an admin makes a new one with `rexec apikey create --role {role.value}`"
            )
        if now - self._touched.get(key.id, 0.0) >= TOUCH_EVERY:
            self._touched[key.id] = now
            try:
                await apikeys.touch(self.rt, key.id, now)
            except SQLAlchemyError as exc:  # bookkeeping only: never fail the request for it
                log.warning("could not record an API key's use", extra={"error": str(exc)})
        return Principal(kind="apikey", id=key.id, name=key.name, role=Role(key.role))


def _role_text(role: Role) -> str:
    return "admin role" if role is Role.ADMIN else f"{role.value} role (or above)"


def route_kind(handler: BaseRouteHandler) -> str | None:
    """``public``, ``agent_auth``, a role's name, or None for a route that declares nothing."""
    opt = handler.opt
    if opt.get("public") or _automatic_options(handler):
        return "public"
    if opt.get("agent_auth"):
        return "agent_auth"
    role = opt.get("role")
    return role.value if isinstance(role, Role) else None


def _automatic_options(handler: BaseRouteHandler) -> bool:
    """Litestar's own OPTIONS answer of each path (204 and an ``Allow`` header, no data)."""
    return (
        isinstance(handler, HTTPRouteHandler)
        and handler.http_methods == {"OPTIONS"}
        and "create_options_handler" in getattr(handler.fn, "__qualname__", "")
    )


async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The one check every route passes (installed on the app, so it covers every router)."""
    kind = route_kind(handler)
    if kind in ("public", "agent_auth"):
        return
    authenticator: Authenticator = connection.app.state.authenticator
    needed = handler.opt.get("role")
    principal = await authenticator.authenticate(
        connection.headers.get("authorization"),
        needed if isinstance(needed, Role) else Role.ADMIN,
    )
    if not isinstance(needed, Role):
        raise PermissionDeniedException(
            f"route {connection.url.path} declares no role, so it is refused to everyone "
            "(a bug in rexec: report it)"
        )
    if not principal.role.allows(needed):
        raise PermissionDeniedException(
            f"this needs the {_role_text(needed)}; the API key "
            f"{principal.name or principal.id} (id {principal.id}) has the "
            f"{principal.role.value} role: ask an admin for a key with "
            f"`rexec apikey create --role {needed.value}`"
        )
    connection.state[STATE_KEY] = principal


def principal(request: Request[Any, Any, Any]) -> Principal:
    """The caller of a route that required a key (set by :func:`guard`)."""
    value = request.state.get(STATE_KEY)
    if not isinstance(value, Principal):
        raise RuntimeError("no principal on this request: the route is not guarded")
    return value


def check_routes(app: Litestar) -> None:
    """Refuse to build an app with a route that declares neither a role nor an exception."""
    undeclared = [
        f"{sorted(handler.http_methods)} {route.path}"
        for route in app.routes
        for handler in getattr(route, "route_handlers", [])
        if isinstance(handler, HTTPRouteHandler) and route_kind(handler) is None
    ]
    if undeclared:
        raise RuntimeError(
            "routes without a role (add **auth.requires(Role...) or auth.PUBLIC): "
            + ", ".join(undeclared)
        )
