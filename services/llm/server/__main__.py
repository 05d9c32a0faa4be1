"""``python -m services.llm.server``: the OpenAI-compatible CPU model server on ``RAG_LLM_SERVE_PORT``."""

from services.common.serve import run
from services.llm.server.app import SERVICE, create_app
from services.llm.server.config import Settings


def main() -> None:
    settings = Settings()
    # The engine loads in the app's startup: the heap is frozen once the startup is done, the model loaded.
    run(SERVICE, settings, lambda: create_app(settings))


if __name__ == "__main__":
    main()
