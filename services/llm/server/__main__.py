"""``python -m services.llm.server``: the OpenAI-compatible CPU model server on ``RAG_LLM_SERVE_PORT``."""

from services.common.cpu import spin_briefly
from services.common.serve import run
from services.llm.server.app import SERVICE, create_app
from services.llm.server.config import Settings


def main() -> None:
    spin_briefly()  # before the engine's loading imports torch: libgomp reads its environment once, then
    settings = Settings()
    run(SERVICE, settings, lambda: create_app(settings))


if __name__ == "__main__":
    main()
