"""The embedding service's lifespan state and the one-line dependencies its handlers take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from services.common.deps import settings_getter, state_getter
from services.common.errors import NotReady
from services.embedding.config import Settings
from services.embedding.model import Batcher


@dataclass
class State:
    """The model loads in the background after start: ``batcher`` is set once it has loaded."""

    settings: Settings
    batcher: Batcher | None = None
    load_error: str = ""


StateDep = Annotated[State, Depends(state_getter(State))]
SettingsDep = Annotated[Settings, Depends(settings_getter(Settings))]


async def get_batcher(state: StateDep) -> Batcher:
    if state.batcher is None:
        raise NotReady(
            f"embedding model failed to load: {state.load_error}"
            if state.load_error
            else "embedding model is still loading"
        )
    return state.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]
