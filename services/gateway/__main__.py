from services.common.serve import run
from services.gateway.app import create_app
from services.gateway.config import Settings

settings = Settings()
run("gateway", settings, lambda: create_app(settings))
