#!/usr/bin/env bash
# The Debian packages the tests use: redis-server (the queue's real Redis), prometheus (evaluates the
# autoscalers' queries) and chromium (the web page test). Installs what is missing when run as root
# with apt-get; otherwise says what to install. kubectl (renders deploy/k8s) must already be there.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "the tests need these Debian packages: ${missing[*]}" >&2
  echo "  sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
command -v kubectl >/dev/null 2>&1 || echo "warning: kubectl is not on PATH; the deploy/k8s tests need it" >&2
