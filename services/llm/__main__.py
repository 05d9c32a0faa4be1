"""``python -m services.llm``: the worker, with its health and metrics on a side port.

SIGTERM (or Ctrl-C) stops reading and drains what is in flight for at most
RAG_LLM_DRAIN_SECONDS; a second signal exits at once, leaving its jobs pending
for the other workers to claim.
"""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

from services.common import stopping, tracing
from services.common.logging import configure_logging
from services.common.memory import freeze_heap
from services.common.metrics import MODEL_INFO
from services.common.queue import make_redis
from services.common.sideserver import side_server
from services.llm.app import create_app
from services.llm.config import Settings
from services.llm.engine import build_engine
from services.llm.worker import Worker

log = structlog.get_logger("services.llm")


async def main(settings: Settings) -> int:
    engine = build_engine(settings)
    redis = make_redis(settings)
    worker = Worker(settings, engine, redis)
    server = side_server(create_app(worker), settings.host, settings.port)
    server_task = asyncio.create_task(server.serve(), name="side-server")

    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("worker_exit_now")
            os._exit(1)
        worker.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    try:
        try:
            await engine.start()
        except Exception:
            log.exception("engine_failed_to_start", backend=settings.llm_backend)
            return 1
        MODEL_INFO.labels("llm", engine.model_name, engine.device).set(1)
        # The engine has loaded: this process's one heap freeze.
        log.info("heap_frozen", objects=freeze_heap())
        if not worker.stopping:
            await worker.run()
        return 0
    finally:
        await engine.close()
        await redis.aclose()
        server.should_exit = True
        await server_task


if __name__ == "__main__":
    settings = Settings()
    stopping.enable()  # a stop signal while the engine loads its model ends the process at once
    configure_logging(settings.log_level, settings.log_json, "llm")
    tracing.setup("llm")
    try:
        code = asyncio.run(main(settings))
    finally:
        tracing.shutdown()
    raise SystemExit(code)
