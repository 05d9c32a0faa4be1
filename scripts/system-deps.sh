#!/usr/bin/env bash
# The Debian packages the tests use: redis-server (the queue's real Redis), prometheus (evaluates the
# autoscalers' queries) and chromium (the web page test). Installs what is missing when run as root
# with apt-get; otherwise says what to install. kubectl (renders deploy/k8s) must already be there.
#
#   scripts/system-deps.sh              # what make test needs
#   scripts/system-deps.sh containers   # what make compose-smoke and make kube-smoke need where Docker is
#                                       # absent: podman with runc, its DNS for container names, and
#                                       # mmdebstrap for the stand-in base images (scripts/podman-base.sh)
set -euo pipefail

missing=()
recommends=--no-install-recommends
if [ "${1:-}" = containers ]; then
  if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    # runc: crun, the other runtime podman takes, refuses a hybrid cgroup layout (a plain VM's).
    command -v runc >/dev/null 2>&1 || missing+=(runc)
    [ -x /usr/lib/podman/aardvark-dns ] || missing+=(netavark aardvark-dns)
    command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
  fi
  recommends=  # podman's recommended helpers (slirp4netns, uidmap, catatonit) are wanted here
else
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $recommends "${missing[@]}" >/dev/null
else
  echo "the tests need these Debian packages: ${missing[*]}" >&2
  echo "  sudo apt-get install $recommends ${missing[*]}" >&2
  exit 1
fi
command -v kubectl >/dev/null 2>&1 || echo "warning: kubectl is not on PATH; the deploy/k8s tests need it" >&2
