"""The GPU paths, on a real CUDA device: ``make test-gpu``. Skipped, saying why, where there is none.

Runs from a checkout with what an accelerator image typically has (torch,
transformers, sentence-transformers, nvidia-ml-py) plus the project's other
dependencies carried as wheels: the pure-Python ones, and orjson (the embedding
service writes its answers with it; uvloop and httptools are optional to
uvicorn), built for the image's Python. Two settings let it run where the
packaged models are not installed or are too large to carry:

- ``RAGPOD_TEST_EMBEDDING_MODEL``: a sentence-transformers directory (default:
  the packaged all-MiniLM-L6-v2);
- ``RAGPOD_TEST_LLM_CONFIG``: a directory with the LLM's ``config.json`` and
  tokenizer (default: read from the packaged SmolLM2 GGUF, which needs
  ``gguf``). The local engine is tested with random weights of that
  architecture: it proves the device path (float16 on CUDA, batching,
  streaming), not answer quality.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from services.embedding.app import create_app
from services.embedding.config import Settings
from services.embedding.model import Embedder
from services.llm.engine import GenerationRequest
from services.llm.local import LocalEngine, LocalOptions, packaged_model_path, prepare
from tests.fixtures.apps import in_process

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU suite needs one"),
]

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "The cat sleeps on the sofa.",
    "A kitten is napping on the couch.",
    "GPU nodes run the LLM pods.",
    "KEDA scales the workers on the queue depth.",
    "Qdrant keeps two replicas of every shard.",
    "x",
    "A longer sentence about retrieval-augmented generation, grounded answers, citations and sources " * 4,
]


def embedding_model() -> str:
    return os.environ.get("RAGPOD_TEST_EMBEDDING_MODEL", "")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_embedding_on_cuda_gives_the_cpu_vectors() -> None:
    cuda = Embedder(embedding_model(), "cuda")
    cpu = Embedder(embedding_model(), "cpu")
    assert cuda.device == "cuda" and cpu.device == "cpu"
    got, want = torch.tensor(cuda.encode(TEXTS)), torch.tensor(cpu.encode(TEXTS))
    assert got.shape == want.shape == (len(TEXTS), cuda.dimension)
    difference = float((got - want).abs().max())
    print(f"embedding cuda vs cpu: max abs difference {difference:.2e}")
    assert difference < 1e-3


class OutOfMemoryOnce:
    """Wraps the CUDA model: its next ``encode`` raises CUDA's out-of-memory error, later ones run."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.failed = False

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")
        return self.model.encode(*args, **kwargs)


async def test_cuda_out_of_memory_falls_back_to_the_cpu_and_counts() -> None:
    embedder = Embedder(embedding_model(), "cuda")
    reference = torch.tensor(embedder.encode(TEXTS[:3]))
    embedder._model = OutOfMemoryOnce(embedder._model)
    async with in_process(create_app(Settings(embedding_device="cuda"), embedder=embedder)) as client:
        async with asyncio.timeout(60):
            while True:
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
        before = metric((await client.get("/metrics")).text, "rag_embedding_fallback_total")
        first = await client.post("/v1/embed", json={"texts": TEXTS[:3]})
        assert first.status_code == 200 and first.json()["device"] == "cuda"
        assert float((torch.tensor(first.json()["vectors"]) - reference).abs().max()) < 1e-3
        after = metric((await client.get("/metrics")).text, "rag_embedding_fallback_total")
        assert after == before + 1
        second = await client.post("/v1/embed", json={"texts": TEXTS[:3]})  # back on the GPU
        assert second.status_code == 200
        assert metric((await client.get("/metrics")).text, "rag_embedding_fallback_total") == after
    assert embedder._cpu_model is not None  # the CPU copy that answered the first request


def llm_config() -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    carried = os.environ.get("RAGPOD_TEST_LLM_CONFIG")
    if carried:
        return AutoConfig.from_pretrained(carried), AutoTokenizer.from_pretrained(carried)
    gguf = Path(packaged_model_path())
    return (
        AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name),
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name),
    )


async def test_local_engine_answers_on_cuda_in_half_precision() -> None:
    from transformers import AutoModelForCausalLM

    config, tokenizer = llm_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    engine = LocalEngine(LocalOptions(device="cuda", max_batch=4), prepare(tokenizer, model, "cuda"))
    await engine.start()
    try:
        assert engine.device == "cuda"
        assert next(model.parameters()).dtype == torch.float16 and next(model.parameters()).is_cuda
        streamed: list[str] = []

        async def on_token(text: str) -> None:
            streamed.append(text)

        questions = [[{"role": "user", "content": f"Question {i}: what is a pod?"}] for i in range(4)]
        answers = await asyncio.gather(
            engine.generate(GenerationRequest(questions[0], max_tokens=8), on_token),
            *(engine.generate(GenerationRequest(q, max_tokens=8)) for q in questions[1:]),
        )
    finally:
        await engine.close()
    for answer in answers:
        assert answer.prompt_tokens > 5
        assert 0 < answer.completion_tokens <= 8 or answer.finish_reason == "stop"
    assert "".join(streamed).strip() == answers[0].text
    print(f"local engine on cuda fp16: {[a.completion_tokens for a in answers]} tokens")


def test_nvml_gauges_present_and_in_range() -> None:
    from prometheus_client import REGISTRY

    from services.common.gpu import Sampler, _nvml

    nvml = _nvml()
    assert nvml is not None, "NVML did not initialise on a machine with CUDA"
    assert Sampler(nvml).sample_once() >= 1
    used = REGISTRY.get_sample_value("rag_gpu_memory_used_bytes", {"gpu": "0"})
    total = REGISTRY.get_sample_value("rag_gpu_memory_total_bytes", {"gpu": "0"})
    utilization = REGISTRY.get_sample_value("rag_gpu_utilization_ratio", {"gpu": "0"})
    assert total is not None and total > 0
    assert used is not None and 0 <= used <= total
    # Absent on MIG (NotSupported); where present it is a ratio.
    assert utilization is None or 0.0 <= utilization <= 1.0
    print(f"nvml gpu0: used {used / 2**30:.1f} of {total / 2**30:.1f} GiB, utilization {utilization}")


def test_bench_embedding_on_cuda() -> None:
    command = [sys.executable, "bench/embedding.py", "--device", "cuda", "--seconds", "4", "--name", "embedding-cuda"]
    if embedding_model():
        command += ["--model", embedding_model()]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ratio=")
    figures = dict(part.split("=", 1) for part in last.split()[1:])
    assert figures["device"] == "cuda"
    assert float(figures["raw_texts_per_s"]) > 0 and float(figures["http_texts_per_s"]) > 0
