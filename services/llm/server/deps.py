"""The model server's lifespan state and the one-line dependencies its handlers take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from services.common.deps import settings_getter, state_getter
from services.llm.engine import Engine
from services.llm.server.config import Settings


@dataclass
class State:
    """What the server opens at start: its settings and the engine (the model loaded)."""

    settings: Settings
    engine: Engine


StateDep = Annotated[State, Depends(state_getter(State))]
SettingsDep = Annotated[Settings, Depends(settings_getter(Settings))]


async def get_engine(state: StateDep) -> Engine:
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
