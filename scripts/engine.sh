# Sourced by scripts/images.sh and scripts/compose-smoke.sh: which container engine, with which flags.
#   ENGINE=docker|podman picks one; otherwise docker if its daemon answers, else podman.
#   PODMAN_FLAGS: podman's global flags. Where systemd does not run (a plain VM or a container),
#   podman's default cgroup manager (systemd) cannot work: --cgroup-manager=cgroupfs is the default there.
# Sets ENGINE (the command, an array), ENGINE_NAME and ENGINE_BUILD_FLAGS.

if [[ -z "${ENGINE_NAME:-}" ]]; then
    if [[ -n "${ENGINE:-}" ]]; then
        ENGINE_NAME="$ENGINE"
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE_NAME=docker
    elif command -v podman >/dev/null 2>&1; then
        ENGINE_NAME=podman
    else
        echo "neither docker nor podman is installed (apt-get install podman)" >&2
        exit 2
    fi
fi

case "$ENGINE_NAME" in
docker)
    ENGINE=(docker)
    ENGINE_BUILD_FLAGS=()
    ;;
podman)
    if [[ -z "${PODMAN_FLAGS+set}" ]]; then
        PODMAN_FLAGS=""
        [[ -d /run/systemd/system ]] || PODMAN_FLAGS="--cgroup-manager=cgroupfs"
    fi
    # shellcheck disable=SC2206
    ENGINE=(podman $PODMAN_FLAGS)
    # Podman builds OCI images by default, which have no HEALTHCHECK.
    ENGINE_BUILD_FLAGS=(--format docker)
    ;;
*)
    echo "ENGINE must be docker or podman, not $ENGINE_NAME" >&2
    exit 2
    ;;
esac
