import sys
from pathlib import Path

from services.common.serve import run
from services.retriever.app import create_app
from services.retriever.config import Settings
from services.retriever.store import LegacyStore
from services.retriever.store.edge import check_not_legacy

settings = Settings()
if not settings.qdrant_url:
    try:
        check_not_legacy(Path(settings.qdrant_path))
    except LegacyStore as exc:  # one clear line, not a traceback
        print(f"retriever: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
run("retriever", settings, lambda: create_app(settings))
