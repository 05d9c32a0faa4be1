#!/usr/bin/env bash
# Smoke test of the compose stack. On a machine with Docker:
# builds the images, brings the stack up, indexes one document, asks one
# question, checks the answer and its sources, and always tears down.
#
#   scripts/compose-smoke.sh              # CPU stack
#   scripts/compose-smoke.sh --gpu        # with docker-compose.gpu.yml
#
# Environment: RAGPOD_GATEWAY_PORT (default 8000) if that port is taken,
# SMOKE_WAIT_SECONDS (default 900) for the stack to come up.
set -euo pipefail

cd "$(dirname "$0")/.."

# With podman (no Docker engine): the same stack from the images make images built, started by
# scripts/compose_smoke.py, which says how.
# shellcheck source=scripts/engine.sh
source scripts/engine.sh
if [[ "$ENGINE_NAME" == podman ]]; then
    ENGINE="${ENGINE[*]}" exec "${PYTHON:-python3}" scripts/compose_smoke.py
fi

files=(-f docker-compose.yml)
if [[ "${1:-}" == "--gpu" ]]; then
    files+=(-f docker-compose.gpu.yml)
    if [[ -z "${RAGPOD_MODELS:-}" ]]; then
        echo "compose-smoke: RAGPOD_MODELS is not set: the model is downloaded into a" \
            "volume that the teardown deletes" >&2
    fi
fi
project="ragpod-smoke-$$"
compose=(docker compose --project-name "$project" "${files[@]}")
base="http://127.0.0.1:${RAGPOD_GATEWAY_PORT:-8000}"
wait_seconds="${SMOKE_WAIT_SECONDS:-900}"

for tool in docker curl python3; do
    command -v "$tool" >/dev/null || { echo "compose-smoke: needs $tool" >&2; exit 2; }
done

teardown() {
    local status=$?
    trap - EXIT
    if [[ $status -ne 0 ]]; then
        echo "compose-smoke: failed; last logs:" >&2
        "${compose[@]}" logs --no-color --tail 40 >&2 || true
    fi
    "${compose[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

echo "compose-smoke: building"
"${compose[@]}" build

echo "compose-smoke: starting (waiting up to ${wait_seconds}s for healthchecks)"
"${compose[@]}" up --detach --wait --wait-timeout "$wait_seconds"

# Healthy means alive; wait until the gateway is ready as well.
deadline=$((SECONDS + wait_seconds))
until curl -fsS "$base/readyz" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
        echo "compose-smoke: gateway never became ready" >&2
        exit 1
    fi
    sleep 2
done

echo "compose-smoke: indexing one document"
curl -fsS -X POST "$base/v1/documents" \
    -H 'content-type: application/json' \
    -d '{"documents": [{"id": "smoke-1", "text": "The ragpod smoke test lighthouse stands on Kestrel Point and its lamp is painted green.", "metadata": {"source": "compose-smoke"}}]}'
echo

echo "compose-smoke: asking one question"
answer="$(curl -fsS -X POST "$base/v1/ask" \
    --max-time 300 \
    -H 'content-type: application/json' \
    -d '{"question": "What colour is the lamp of the lighthouse on Kestrel Point?", "top_k": 3}')"
echo "$answer"

ANSWER="$answer" python3 - <<'PY'
import json
import os
import sys

body = json.loads(os.environ["ANSWER"])
answer = body.get("answer")
sources = body.get("sources")
if not isinstance(answer, str) or not answer.strip():
    sys.exit("compose-smoke: the answer is empty")
if not isinstance(sources, list) or not sources:
    sys.exit("compose-smoke: no sources came back")
print(f"compose-smoke: ok ({len(sources)} sources): {answer.strip()[:120]}")
PY
