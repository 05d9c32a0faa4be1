from __future__ import annotations

from pydantic import BaseModel, Field


class EmbedRequest(BaseModel):
    texts: list[str] = Field(..., min_length=1, description="Texts to embed, in order.")


class EmbedResponse(BaseModel):
    vectors: list[list[float]]
    model: str
    dimension: int
    device: str


class InfoResponse(BaseModel):
    model: str
    dimension: int
    device: str
