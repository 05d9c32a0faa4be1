from services.common.serve import run
from services.embedding.app import create_app
from services.embedding.config import Settings

settings = Settings()
# The model loads after the startup, so that /healthz answers at once: the app freezes the heap (this
# process's one freeze) once the model has loaded, not the startup.
run("embedding", settings, lambda: create_app(settings, freeze_after_load=True), freeze_when_started=False)
