from services.common.cpu import spin_briefly

spin_briefly()  # before anything imports torch: libgomp reads its environment once, then

from services.common.serve import run  # noqa: E402
from services.embedding.app import create_app  # noqa: E402
from services.embedding.config import Settings  # noqa: E402

settings = Settings()
run("embedding", settings, lambda: create_app(settings, freeze_after_load=True))
