from services.common.cpu import spin_briefly
from services.common.serve import run
from services.embedding.app import create_app
from services.embedding.config import Settings

spin_briefly()  # before the model's loading imports torch: libgomp reads its environment once, then
settings = Settings()
run("embedding", settings, lambda: create_app(settings, freeze_after_load=True))
