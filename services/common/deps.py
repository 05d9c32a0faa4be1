"""Dependencies every service shares: its lifespan state, its settings and the request id.

Each service's lifespan yields ``{STATE_KEY: state}``, one typed object (a
dataclass) holding what it opened at start. The server copies that mapping
into every request's scope, so a handler reaches the state through a
one-line alias instead of ``app.state`` attributes typed ``Any``::

    StateDep = Annotated[State, Depends(state_getter(State))]
    SettingsDep = Annotated[Settings, Depends(settings_getter(Settings))]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from services.common.errors import NotReady

STATE_KEY = "service"
"""The key the lifespan state is yielded under (``yield {STATE_KEY: state}``)."""

S = TypeVar("S")


def lifespan_state(state: object) -> dict[str, Any]:
    """What a lifespan yields: ``yield lifespan_state(state)``."""
    return {STATE_KEY: state}


def state_getter(cls: type[S]) -> Callable[[Request], Awaitable[S]]:
    """A dependency returning the service's lifespan state, checked to be a ``cls``.

    Dependencies here are ``async def`` although they never wait: FastAPI runs a plain ``def``
    dependency in a worker thread, a thread hop per dependency per request (in a profile of the
    embedding route, about a third of the time a request spent in the process).
    """

    async def get_state(request: Request) -> S:
        state = request.scope.get("state", {}).get(STATE_KEY)
        if not isinstance(state, cls):
            raise NotReady("the service has not finished starting")
        return state

    get_state.__name__ = f"get_{cls.__name__.lower()}"
    return get_state


def settings_getter(cls: type[S]) -> Callable[[Request], Awaitable[S]]:
    """A dependency returning the ``settings`` of the service's lifespan state, checked to be a ``cls``."""

    async def get_settings(request: Request) -> S:
        settings = getattr(request.scope.get("state", {}).get(STATE_KEY), "settings", None)
        if not isinstance(settings, cls):
            raise NotReady("the service has not finished starting")
        return settings

    return get_settings


async def request_id(request: Request) -> str:
    """The request id bound by ``RequestIdMiddleware`` (the caller's ``X-Request-ID`` or a new one)."""
    return str(request.scope.get("state", {}).get("request_id", ""))


RequestIdDep = Annotated[str, Depends(request_id)]
