from services.common.serve import run
from services.embedding.app import create_app
from services.embedding.config import Settings

settings = Settings()
run("embedding", settings, lambda: create_app(settings, freeze_after_load=True))
