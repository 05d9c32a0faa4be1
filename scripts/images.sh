#!/usr/bin/env bash
# Builds every image that docker-compose.yml and deploy/k8s name, from ./Dockerfile, tagged
# ragpod/<service>:<version of pyproject.toml>[-cpu], with docker or podman (whichever is present), and
# prints each image's size.
#
#   scripts/images.sh                      # all five
#   scripts/images.sh gateway retriever    # only these (names as in the table below)
#
# Environment (make images passes its variables of the same names):
#   ENGINE              docker or podman (default: docker if it answers, else podman)
#   TAG                 the tag (default: the project's version)
#   TORCH_SOURCE        index, wheels or auto (default). auto: PyTorch's wheel index when it answers, else
#                       torch and its requirements as pip finds them with this machine's own configuration
#                       (find-links, a mirror), downloaded into build/wheels and sent with the build context.
#   TORCH_INDEX         another index for the CPU torch (with TORCH_SOURCE=index)
#   PODMAN_FLAGS        podman's global flags (default: --cgroup-manager=cgroupfs where systemd does not run)
#   BUILD_FLAGS         extra flags for every build (podman on a host that needs them: --isolation chroot)
set -euo pipefail
cd "$(dirname "$0")/.."

# name, build target, image repository, tag suffix
IMAGES=(
    "gateway       gateway        ragpod/gateway"
    "retriever     retriever      ragpod/retriever"
    "embedding     embedding-cpu  ragpod/embedding"
    "llm           llm-worker     ragpod/llm"
    "llm-cpu       llm-cpu        ragpod/llm -cpu"
)
TORCH_VERSION=2.13.0
PYTORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# shellcheck source=scripts/engine.sh
source scripts/engine.sh

tag="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)}"
[[ -n "$tag" ]] || { echo "images: no version in pyproject.toml" >&2; exit 2; }

wanted=("$@")
selected=()
for line in "${IMAGES[@]}"; do
    read -r name _ <<<"$line"
    if [[ ${#wanted[@]} -eq 0 ]] || [[ " ${wanted[*]} " == *" $name "* ]]; then
        selected+=("$line")
    fi
done
[[ ${#selected[@]} -gt 0 ]] || { echo "images: none of ${wanted[*]} is an image here" >&2; exit 2; }

# Where torch comes from, for the images that carry it.
torch_source="${TORCH_SOURCE:-auto}"
if [[ "$torch_source" == auto ]]; then
    if [[ -n "${TORCH_INDEX:-}" ]] || curl -fsS --max-time 10 -o /dev/null "$PYTORCH_CPU_INDEX/torch/" 2>/dev/null; then
        torch_source=index
    else
        torch_source=wheels
    fi
fi
build_args=(--build-arg "TORCH_SOURCE=$torch_source")
[[ -n "${TORCH_INDEX:-}" ]] && build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
if [[ "$torch_source" == wheels ]]; then
    # torch and its own requirements: the build installs them with no index at all.
    echo "images: torch $TORCH_VERSION and its requirements into build/wheels, with pip's own configuration"
    "${PIP:-pip}" download --quiet --only-binary=:all: --python-version 3.11 -d build/wheels "torch==$TORCH_VERSION"
fi

# The base image the Dockerfile starts FROM: where no registry answers, podman gets a local stand-in.
if [[ "$ENGINE_NAME" == podman ]]; then
    PODMAN="${ENGINE[*]}" scripts/podman-base.sh python
fi

built=()
for line in "${selected[@]}"; do
    read -r name target repository suffix <<<"$line"
    image="$repository:$tag${suffix:-}"
    echo "images: building $image (target $target, torch from $torch_source)"
    start=$SECONDS
    # shellcheck disable=SC2086
    "${ENGINE[@]}" build "${ENGINE_BUILD_FLAGS[@]}" ${BUILD_FLAGS:-} "${build_args[@]}" \
        --target "$target" --tag "$image" --file Dockerfile .
    echo "images: $image built in $((SECONDS - start)) s"
    built+=("$image")
done

echo
printf '%-32s %8s\n' IMAGE SIZE
for image in "${built[@]}"; do
    bytes="$("${ENGINE[@]}" image inspect --format '{{.Size}}' "$image")"
    printf '%-32s %5d MB\n' "$image" "$((bytes / 1000000))"
done
