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
    # Podman raises every container's open-file and process limits (to 1048576 and more) and where the
    # host may not raise them (a VM, a sandbox) every start fails with "error setting rlimit". Unless
    # /etc/containers/containers.conf sets them, a containers.conf of the project's own asks for the
    # host's hard limit on open files and 4096 processes (threads) per user: plenty for one service, and
    # allowed where 65536 was not.
    if [[ -z "${CONTAINERS_CONF:-}" ]] && ! grep -qs '^default_ulimits' /etc/containers/containers.conf; then
        nofile="$(ulimit -Hn)" nproc="$(ulimit -Hu)"
        [[ "$nofile" == unlimited || "$nofile" -gt 1048576 ]] && nofile=1048576
        [[ "$nproc" == unlimited || "$nproc" -gt 4096 ]] && nproc=4096
        CONTAINERS_CONF="${XDG_CACHE_HOME:-$HOME/.cache}/ragpod/containers.conf"
        mkdir -p "$(dirname "$CONTAINERS_CONF")"
        printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' \
            "$nofile" "$nofile" "$nproc" "$nproc" >"$CONTAINERS_CONF"
        export CONTAINERS_CONF
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
