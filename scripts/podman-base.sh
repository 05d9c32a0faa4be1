#!/usr/bin/env bash
# Stand-in base images for a machine that cannot pull from an image registry, made from Debian's own
# packages with mmdebstrap and tagged with the names the build and the smoke test use:
#
#   scripts/podman-base.sh python   # python:3.11.14-slim-bookworm, the Dockerfile's FROM
#   scripts/podman-base.sh redis    # ragpod-smoke/redis, Debian's redis-server, for make compose-smoke
#
# Each image is made only when it is missing and cannot be pulled, and reused when present. The python
# stand-in is Debian bookworm with its own Python 3.11, not the official image: images built on it are for
# checks on this machine, not for shipping. The host's CA bundle goes into it, so pip and uv inside a build
# trust what the host trusts (a proxy that re-signs TLS, for one).
#
# Environment: PODMAN (default: podman with the flags scripts/images.sh detects), DEBIAN_SUITE (bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:?usage: scripts/podman-base.sh python|redis}"
suite="${DEBIAN_SUITE:-bookworm}"
# shellcheck disable=SC2206
podman=(${PODMAN:-podman})
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

case "$what" in
python)
    image="docker.io/library/python:3.11.14-slim-bookworm"
    packages="python3,python3-venv,ca-certificates"
    ;;
redis)
    image="localhost/ragpod-smoke/redis:${suite}"
    packages="redis-server"
    ;;
*)
    echo "podman-base: unknown image $what (python or redis)" >&2
    exit 2
    ;;
esac

if "${podman[@]}" image exists "$image"; then
    exit 0
fi
if [[ "$what" == python ]] && "${podman[@]}" pull --quiet "$image" >/dev/null 2>&1; then
    exit 0
fi
for tool in mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "podman-base: needs $tool (apt-get install mmdebstrap)" >&2; exit 2; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "podman-base: making $image from Debian $suite ($packages)"
rootfs="localhost/ragpod-smoke/debian-$what:$suite"
if ! "${podman[@]}" image exists "$rootfs"; then
    mmdebstrap --quiet --variant=minbase --include="$packages" "$suite" "$work/rootfs.tar"
    "${podman[@]}" import --quiet "$work/rootfs.tar" "$rootfs" >/dev/null
fi

case "$what" in
python)
    cp "$ca_bundle" "$work/ca-certificates.crt"
    cat >"$work/Containerfile" <<CONTAINERFILE
FROM $rootfs
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    LANG=C.UTF-8
RUN ln -s /usr/bin/python3 /usr/local/bin/python
CMD ["python3"]
CONTAINERFILE
    ;;
redis)
    # Redis as the official image runs it: its own user, data in /data, and a redis-server command with no
    # configuration file listening on every address without protected mode (the network is the boundary).
    cat >"$work/redis-entrypoint" <<'ENTRYPOINT'
#!/bin/sh
if [ "${1:-}" = redis-server ]; then
    shift
    exec redis-server --bind 0.0.0.0 --protected-mode no "$@"
fi
exec "$@"
ENTRYPOINT
    cat >"$work/Containerfile" <<CONTAINERFILE
FROM $rootfs
COPY --chmod=755 redis-entrypoint /usr/local/bin/redis-entrypoint
RUN mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
CONTAINERFILE
    ;;
esac
# shellcheck disable=SC2086
"${podman[@]}" build --quiet --format docker ${PODMAN_BUILD_FLAGS:-} -t "$image" "$work" >/dev/null
echo "podman-base: $image ready"
