"""One question, whichever route asks it, takes one path: the calls it makes between the services are counted."""

from __future__ import annotations

import pytest

from tests.fixtures.gateway_stack import Stack, stack

__all__ = ["stack"]

DOC = {"id": "zorblax", "text": "The Zorblax was first sold in 1987. It was made of brass."}
QUESTION = "When was the Zorblax first sold?"

FOUR_CALLS = [
    ("gateway", "retriever", "POST /v1/search"),
    ("retriever", "embedding", "POST /v1/embed"),  # the question's vector
    ("gateway", "embedding", "POST /v1/embed"),  # the sources' sentences, while the answer is generated
    ("gateway", "embedding", "POST /v1/embed"),  # the answer's sentences
]


async def indexed(stack: Stack) -> None:
    response = await stack.gateway.post("/v1/documents", json={"documents": [DOC]})
    assert response.status_code == 200, response.text
    stack.calls.clear()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answered_question_makes_four_calls_between_services(stack: Stack, stream: bool) -> None:
    await indexed(stack)
    response = await stack.gateway.post("/v1/ask", json={"question": QUESTION, "top_k": 1, "stream": stream})
    assert response.status_code == 200, response.text
    assert "citations" in response.text  # attributed: the answer's sentences were embedded
    assert stack.calls == FOUR_CALLS


async def test_a_chat_question_makes_the_same_four_calls(stack: Stack) -> None:
    await indexed(stack)
    body = {"model": "ragpod", "messages": [{"role": "user", "content": QUESTION}], "top_k": 1}
    response = await stack.gateway.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["ragpod"]["citations"]
    assert stack.calls == FOUR_CALLS


async def test_a_search_makes_two_calls_and_embeds_nothing_for_attribution(stack: Stack) -> None:
    await indexed(stack)
    response = await stack.gateway.post("/v1/search", json={"question": QUESTION, "top_k": 1})
    assert response.status_code == 200, response.text
    assert stack.calls == FOUR_CALLS[:2]
