#!/usr/bin/env bash
# make kube-smoke: scripts/kube_smoke.py (the cpu-only overlay's pods under podman kube play) with the
# podman command and settings scripts/engine.sh settles. Podman only: docker has no kube play, and the
# images must be in podman's store (ENGINE=podman make images where both are installed).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v podman >/dev/null 2>&1 || { echo "kube-smoke: needs podman (apt-get install podman runc)" >&2; exit 2; }
ENGINE_NAME=podman
# shellcheck source=scripts/engine.sh
source scripts/engine.sh
ENGINE="${ENGINE[*]}" exec "${PYTHON:-python3}" scripts/kube_smoke.py
