"""make kube-smoke: the cluster's own pod specs, run with ``podman kube play``.

Renders an overlay (``cpu-only`` by default) with ``kubectl kustomize`` and runs its Deployments of the
gateway, the embedding service, the retriever and the LLM worker with its model server, as rendered: image,
command and args, env from the ConfigMaps and Secrets, ports, user, read-only root with its emptyDirs,
probes. Then it requires each container's readiness probe path to answer 200, each container to run as
the pod's user on a read-only root with writable emptyDirs, the gateway's ``/v1/status`` to find every
dependency ok, and one demo question to be answered with sources. Nothing is left behind.

What cannot run here as on a cluster, and how it is bridged (each change is made to the rendered YAML, in
memory, and printed):

- Services: podman names each Deployment's pod ``<name>-pod-0`` and has no Services; the Service names in
  the ConfigMaps' URLs (``http://embedding:8001``) are rewritten to those pod names, which every pod finds
  in its /etc/hosts (``hostAliases``, on a network without DNS where each pod has a fixed address: podman's
  DNS here answered lookups only after seconds while containers started, see compose_smoke.py).
- Redis: the StatefulSet with Sentinel is not run. A Redis stand-in pod (the official image, or one made
  from Debian's redis-server) is added, ``RAG_REDIS_SENTINELS`` is emptied and the ``redis-auth`` Secret
  points at it.
- Qdrant: where its image cannot be pulled, the retriever uses its embedded Qdrant Edge store in its
  ``/tmp`` emptyDir (``RAG_QDRANT_URL`` empty, ``RAG_QDRANT_PATH`` set).
- Native sidecars: podman 4.3 refuses an init container that carries probes and ignores its
  ``restartPolicy: Always``; such a sidecar runs as an ordinary container of its pod.
- One replica each; scheduling fields (affinity, spread, priority, node selectors) mean nothing on one host.

Environment: ENGINE (the podman command with its global flags), OVERLAY (deploy/k8s/overlays/<name>),
SMOKE_WAIT_SECONDS (default 900).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from compose_smoke import (
    ENGINE,
    REDIS_STAND_IN,
    ROOT,
    SERVICE_UID,
    WAIT_SECONDS,
    ask,
    available,
    create_network,
    engine,
)

from ragpod.processes import port_open

OVERLAY = os.environ.get("OVERLAY", "cpu-only")
DEPLOYMENTS = ("embedding", "retriever", "llm", "gateway")
REDIS_IMAGE = "docker.io/library/redis:7.4-bookworm"
QDRANT_IMAGE = "docker.io/qdrant/qdrant:v1.19.1"
NETWORK = f"ragpod-kube-smoke-{os.getpid()}"
SCHEDULING = ("affinity", "topologySpreadConstraints", "nodeSelector", "tolerations", "priorityClassName")

Doc = dict[str, Any]


def render() -> list[Doc]:
    overlay = ROOT / "deploy" / "k8s" / "overlays" / OVERLAY
    result = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"kube-smoke: kubectl kustomize {overlay}: {result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_name(deployment: str) -> str:
    return f"{deployment}-pod-0"


def pods_of(docs: list[Doc]) -> dict[str, Doc]:
    found = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    missing = [name for name in DEPLOYMENTS if name not in found]
    if missing:
        sys.exit(f"kube-smoke: the {OVERLAY} overlay renders no Deployment {missing}")
    return {name: copy.deepcopy(found[name]) for name in DEPLOYMENTS}


def containers(deployment: Doc) -> list[Doc]:
    spec = deployment["spec"]["template"]["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def referenced(deployments: dict[str, Doc], kind: str) -> set[str]:
    """Names of the ConfigMaps (``configMap``) or Secrets (``secret``) the containers read env from."""
    names = set()
    for deployment in deployments.values():
        for ctr in containers(deployment):
            for source in ctr.get("envFrom") or []:
                if f"{kind}Ref" in source:
                    names.add(source[f"{kind}Ref"]["name"])
            for env in ctr.get("env") or []:
                ref = (env.get("valueFrom") or {}).get(f"{kind}KeyRef")
                if ref:
                    names.add(ref["name"])
    return names


def bridge(docs: list[Doc], notes: list[str], *, embedded_qdrant: bool) -> tuple[list[Doc], dict[str, dict[str, str]]]:
    """The rendered documents podman is given (the four Deployments and the ConfigMaps they read) and the
    Secrets they read, which podman 4.3 takes only as its own secrets. Each change is added to ``notes``."""
    deployments = pods_of(docs)
    configmaps = {d["metadata"]["name"]: copy.deepcopy(d) for d in docs if d["kind"] == "ConfigMap"}
    wanted = referenced(deployments, "configMap")
    maps = [configmaps[name] for name in sorted(wanted)]

    hosts = {name: pod_name(name) for name in DEPLOYMENTS}
    for cm in maps:
        for key, value in (cm.get("data") or {}).items():
            for service, pod in hosts.items():
                if isinstance(value, str) and f"//{service}:" in value:
                    cm["data"][key] = value = value.replace(f"//{service}:", f"//{pod}:")
                    notes.append(f"{cm['metadata']['name']}: {key}={value} (the Service name as podman's pod name)")
            if key == "RAG_REDIS_SENTINELS" and value:
                cm["data"][key] = ""
                notes.append(f"{cm['metadata']['name']}: {key} emptied (Redis is one stand-in pod, no Sentinel)")

    redis_url = f"redis://{pod_name('redis')}:6379/0"
    secrets = {}
    for name in sorted(referenced(deployments, "secret")):
        if name == "redis-auth":
            secrets[name] = {"url": redis_url}
            notes.append(f"Secret redis-auth: url={redis_url} (the Redis stand-in)")
        # Others (API keys, the Qdrant key) are optional in the manifests and left absent, as by default.

    if embedded_qdrant:
        retriever = next(cm for cm in maps if "RAG_QDRANT_URL" in (cm.get("data") or {}))
        retriever["data"].update(RAG_QDRANT_URL="", RAG_QDRANT_PATH="/tmp/qdrant")
        notes.append(
            f"{retriever['metadata']['name']}: RAG_QDRANT_URL emptied, RAG_QDRANT_PATH=/tmp/qdrant (no Qdrant "
            "image here: the retriever's embedded Qdrant Edge store in its /tmp emptyDir)"
        )

    for name, deployment in deployments.items():
        deployment["spec"]["replicas"] = 1
        spec = deployment["spec"]["template"]["spec"]
        for field in SCHEDULING:
            spec.pop(field, None)
        sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
        for sidecar in sidecars:
            spec["initContainers"].remove(sidecar)
            sidecar.pop("restartPolicy")
            spec["containers"].insert(0, sidecar)
            notes.append(f"{name}: native sidecar {sidecar['name']} run as an ordinary container")
        if not spec.get("initContainers"):
            spec.pop("initContainers", None)

    return [*maps, *deployments.values()], secrets


def create_secrets(secrets: dict[str, dict[str, str]]) -> None:
    """Each as the podman secret kube play reads for a ``secretKeyRef``: JSON of key to base64 value."""
    for name, data in secrets.items():
        engine("secret", "rm", name, check=False, quiet=True)
        content = json.dumps({key: base64.b64encode(value.encode()).decode() for key, value in data.items()})
        subprocess.run(
            [*ENGINE, "secret", "create", name, "-"], input=content, text=True, check=True, stdout=subprocess.DEVNULL
        )


def redis_pod() -> Doc:
    image = REDIS_IMAGE
    if not available(image):
        subprocess.run(
            [str(ROOT / "scripts" / "podman-base.sh"), "redis"],
            check=True,
            env={**os.environ, "PODMAN": " ".join(ENGINE)},
        )
        image = REDIS_STAND_IN
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "redis"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "redis"}},
            "template": {
                "metadata": {"labels": {"app": "redis"}},
                "spec": {"containers": [{"name": "redis", "image": image, "args": ["redis-server"]}]},
            },
        },
    }


def pod_ip(deployment: str) -> str:
    result = engine("pod", "inspect", "--format", "{{.InfraContainerID}}", pod_name(deployment))
    infra = result.stdout.strip()
    address = engine("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", infra)
    return address.stdout.strip()


def probes(deployments: list[Doc]) -> dict[str, str]:
    """Each container's readiness probe as a URL on its pod's address."""
    urls = {}
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        ip = pod_ip(name)
        for ctr in containers(deployment):
            probe = (ctr.get("readinessProbe") or {}).get("httpGet")
            if not probe:
                continue
            port = probe["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in ctr.get("ports") or [] if p.get("name") == port)
            urls[f"{name}/{ctr['name']}"] = f"http://{ip}:{port}{probe['path']}"
    return urls


def wait_ready(urls: dict[str, str]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    pending = dict(urls)
    began = time.monotonic()
    while pending:
        for name, url in list(pending.items()):
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    print(f"kube-smoke: {name}: {url} answered 200 after {time.monotonic() - began:.0f} s", flush=True)
                    del pending[name]
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"readiness probes not 200 after {WAIT_SECONDS:.0f} s: {sorted(pending)}")
        time.sleep(2)


def whole_chain(gateway: str) -> dict[str, str]:
    """The gateway's view of every service behind it, once all are ok (workers report within seconds)."""
    deadline = time.monotonic() + 120
    while True:
        body = httpx.get(f"{gateway}/v1/status", timeout=30).json()
        if body.get("status") == "ok":
            checks: dict[str, str] = body["checks"]
            return checks
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway's /v1/status: {body}")
        time.sleep(2)


def check_containers(deployments: list[Doc]) -> list[str]:
    failures = []
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        uid = str((spec.get("securityContext") or {}).get("runAsUser", SERVICE_UID))
        for ctr in containers(deployment):
            running = f"{pod_name(name)}-{ctr['name']}"
            got = engine("exec", running, "id", "-u").stdout.strip()
            if got != uid:
                failures.append(f"{running} runs as uid {got}, not {uid}")
            read_only = (ctr.get("securityContext") or {}).get("readOnlyRootFilesystem")
            touched = read_only and engine("exec", running, "touch", "/.probe", check=False, quiet=True).returncode == 0
            if touched:
                failures.append(f"{running}: the root file system is writable")
            for mount in ctr.get("volumeMounts") or []:
                probe = f"{mount['mountPath']}/.kube-smoke-probe"
                if engine("exec", running, "touch", probe, check=False, quiet=True).returncode != 0:
                    failures.append(f"{running}: its emptyDir {mount['mountPath']} is not writable")
    return failures


def main() -> int:
    notes: list[str] = []
    docs, secrets = bridge(render(), notes, embedded_qdrant=not available(QDRANT_IMAGE))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    for ctr in (c for d in deployments for c in containers(d)):
        if engine("image", "exists", ctr["image"], check=False, quiet=True).returncode != 0:
            sys.exit(f"kube-smoke: {ctr['image']} is not built (make images)")
    # Podman 4.3 publishes every containerPort on the host's 0.0.0.0 (a later podman only hostPorts).
    ports = sorted({p["containerPort"] for d in deployments for c in containers(d) for p in c.get("ports") or []})
    taken = [port for port in ports if port_open(port)]
    if taken:
        sys.exit(f"kube-smoke: ports {taken} are in use here; podman kube play publishes each containerPort")
    print(f"kube-smoke: the {OVERLAY} overlay's pods, with these changes for one host:")
    for note in notes:
        print(f"  - {note}")

    status = 1
    with tempfile.TemporaryDirectory(prefix="ragpod-kube-smoke-") as tmp:
        manifest = Path(tmp) / "pods.yaml"
        pods = [*deployments, redis_pod()]
        addresses = create_network(NETWORK, [pod_name(d["metadata"]["name"]) for d in pods])
        for pod in pods:
            aliases = [{"ip": ip, "hostnames": [host]} for host, ip in addresses.items()]
            pod["spec"]["template"]["spec"]["hostAliases"] = aliases
        manifest.write_text(yaml.safe_dump_all([*docs, pods[-1]], sort_keys=False))
        ips = [flag for ip in addresses.values() for flag in ("--ip", ip)]
        create_secrets(secrets)
        began = time.monotonic()
        try:
            played = engine("kube", "play", "--network", NETWORK, *ips, str(manifest), check=False, quiet=True)
            if played.returncode != 0:
                raise RuntimeError(f"podman kube play: {played.stderr.strip()[-2000:]}")
            for pod in pods:
                name = pod["metadata"]["name"]
                given, got = addresses[pod_name(name)], pod_ip(name)
                if got != given:
                    raise RuntimeError(f"{pod_name(name)} is at {got}, not {given}")
            wait_ready(probes(deployments))
            gateway = f"http://{pod_ip('gateway')}:8000"
            print(f"kube-smoke: the gateway's /v1/status: {whole_chain(gateway)}", flush=True)
            to_answer = ask(gateway, began, label="kube-smoke")
            failures = check_containers(deployments)
            for failure in failures:
                print(f"kube-smoke: {failure}", file=sys.stderr)
            if not failures:
                status = 0
                print(f"RESULT kube-smoke: every readiness probe 200, first answer {to_answer:.0f} s after kube play")
        except (RuntimeError, httpx.HTTPError, ValueError) as exc:
            print(f"kube-smoke: {exc}", file=sys.stderr)
            for deployment in deployments:
                for ctr in containers(deployment):
                    running = f"{pod_name(deployment['metadata']['name'])}-{ctr['name']}"
                    out = engine("logs", "--tail", "30", running, check=False, quiet=True)
                    print(f"--- {running}\n{out.stdout}{out.stderr}", file=sys.stderr)
        finally:
            engine("kube", "down", str(manifest), check=False, quiet=True)
            engine("network", "rm", "--force", NETWORK, check=False, quiet=True)
            for name in secrets:
                engine("secret", "rm", name, check=False, quiet=True)
            left = [p for p in engine("pod", "ps", "--format", "{{.Name}}").stdout.split() if p.endswith("-pod-0")]
            left = [p for p in left if p.removesuffix("-pod-0") in (*DEPLOYMENTS, "redis")]
            if left:
                print(f"kube-smoke: left behind after kube down: {left}", file=sys.stderr)
                status = 1
            else:
                print("kube-smoke: stopped; no pod or network left")
    return status


if __name__ == "__main__":
    sys.exit(main())
