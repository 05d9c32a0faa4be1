#!/usr/bin/env bash
# checkov on what the overlays render (not on the raw base and patches).
#
#   deploy/k8s/checkov.sh                 # every overlay, compact text
#   deploy/k8s/checkov.sh -o json         # extra arguments go to checkov
#
# checkov lives in a virtualenv of its own, in the user's cache directory
# (CHECKOV_VENV elsewhere), made here on first use with a pinned version and
# shared by every checkout: it pins packages older than the project's
# environment needs. It runs with
# --skip-download, offline. A check skipped for a workload carries its reason
# in a checkov.io/skipN annotation on that workload.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="3.3.30"
venv="${CHECKOV_VENV:-${XDG_CACHE_HOME:-${HOME}/.cache}/ragpod/checkov-${version}}"

if [ ! -x "${venv}/bin/checkov" ]; then
  python3 -m venv "${venv}"
  "${venv}/bin/pip" install --quiet --disable-pip-version-check "checkov==${version}" >&2
fi

rendered="$(mktemp -d)"
trap 'rm -rf "${rendered}"' EXIT
for overlay in "${root}"/deploy/k8s/overlays/*/; do
  name="$(basename "${overlay}")"
  kubectl kustomize "${overlay}" > "${rendered}/${name}.yaml"
done

if [ "$#" -eq 0 ]; then
  set -- --compact --quiet
fi
"${venv}/bin/checkov" --skip-download --framework kubernetes --directory "${rendered}" "$@"
