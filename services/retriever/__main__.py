from services.common.serve import run
from services.retriever.app import create_app
from services.retriever.config import Settings

settings = Settings()
run("retriever", settings, lambda: create_app(settings))
