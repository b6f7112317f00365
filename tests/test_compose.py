"""The production compose file and learner image agree with the code.

No Docker engine is needed: the files are parsed and checked against the real
settings (:mod:`stream_learner.config`) and the real CLI parser
(:func:`stream_learner.cli.build_parser`), so a renamed setting or sub-command
breaks this test instead of a deployment.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_learner.cli import build_parser
from stream_learner.config import ENV_PREFIX, FIELDS, env_name, load_settings
from stream_learner.errors import ConfigError

ROOT = Path(__file__).parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

INFRA_SERVICES = ("kafka", "redis")
LEARNER_SERVICES = ("topics", "joiner", "trainer", "serving")
ONE_SHOT_SERVICES = ("topics",)
LEARNING_PROFILE = "learning"
SERVING_PROFILE = "serving"
LEARNER_IMAGE = "stream-learner:latest"
LEARNER_DOCKERFILE = "docker/Dockerfile"
TORCH_PIN = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CHECKPOINT_MESSAGE_BYTES = 10 * 1024 * 1024

# ${NAME}, ${NAME:-default}, ${NAME-default}; anything else compose supports
# (${NAME:?err}, ${NAME:+alt}) is refused so the checks never guess.
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")
_SETTING_NAME = re.compile(re.escape(ENV_PREFIX) + r"[A-Z0-9_]*[A-Z0-9]")


# --- helpers -----------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _service(name: str) -> dict[str, Any]:
    return _compose()["services"][name]


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as compose sees it (mapping or ``KEY=VALUE`` list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out: dict[str, str | None] = {}
        for item in env:
            key, sep, value = str(item).partition("=")
            out[key] = value if sep else None
        return out
    return {k: None if v is None else (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in env.items()}


def interpolate(value: str, shell: dict[str, str]) -> str:
    """Resolve ``${NAME}``, ``${NAME:-default}`` and ``${NAME-default}`` like compose."""

    def sub(m: re.Match[str]) -> str:
        name, op, default = m.group("name"), m.group("op"), m.group("default")
        if op == ":-":
            return shell.get(name) or default
        if op == "-":
            return shell[name] if name in shell else default
        return shell.get(name, "")

    out = _INTERPOLATION.sub(sub, value.replace("$$", "\0"))
    assert "$" not in out, f"unsupported interpolation in {value!r}"
    return out.replace("\0", "$")


def container_env(name: str, shell: dict[str, str] | None = None) -> dict[str, str]:
    """The STREAM_LEARNER_* variables a service's container gets, after interpolation."""
    shell = shell or {}
    env = {}
    for key, value in _environment(_service(name)).items():
        if not key.startswith(ENV_PREFIX):
            continue
        if value is None:  # `- KEY` passes the shell's value through
            if key in shell:
                env[key] = shell[key]
            continue
        env[key] = interpolate(value, shell)
    return env


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the stream-learner parser has no sub-commands")


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd, "a learner service needs a command (the role to run)"
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf:
            instr, _, args = buf.partition(" ")
            out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends in a line continuation"
    return out


def _runs() -> list[str]:
    return [args for instr, args in _dockerfile_instructions() if instr == "RUN"]


_PIP_INSTALL_PROJECT = re.compile(r"\bpip3? install\b(?:\s+-\S+(?:\s+[^-.\s]\S*)?)*\s+\.(?:\[[^\]\s]*\])?(?=\s|$|&|;)")


# --- services ----------------------------------------------------------------


def test_services_exist():
    services = _compose()["services"]
    for name in INFRA_SERVICES + LEARNER_SERVICES:
        assert name in services, f"service {name!r} missing from {COMPOSE_FILE.name}"


def test_kafka_is_official_image_pinned_to_4x_in_kraft_mode():
    kafka = _service("kafka")
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"]), kafka["image"]
    env = _environment(kafka)
    roles = (env.get("KAFKA_PROCESS_ROLES") or "").split(",")
    assert "controller" in roles and "broker" in roles
    assert env.get("KAFKA_NODE_ID") == "1"
    assert env.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "").startswith("1@kafka:")
    assert "CONTROLLER://" in env.get("KAFKA_LISTENERS", "")
    assert env.get("KAFKA_ADVERTISED_LISTENERS") == "PLAINTEXT://kafka:9092"
    assert env.get("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR") == "1"
    assert env.get("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR") == "1"
    assert int(env.get("KAFKA_MESSAGE_MAX_BYTES") or 0) >= CHECKPOINT_MESSAGE_BYTES


def test_kafka_keeps_its_data_in_a_named_volume():
    compose = _compose()
    log_dir = _environment(compose["services"]["kafka"]).get("KAFKA_LOG_DIRS")
    assert log_dir, "without KAFKA_LOG_DIRS the image writes to /tmp"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"]["kafka"]["volumes"]}
    assert log_dir in mounts, f"{log_dir} is not a volume"
    assert mounts[log_dir] in (compose.get("volumes") or {}), "kafka data is not a named volume"


def test_redis_is_pinned_and_durable():
    redis = _service("redis")
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?", redis["image"]), redis["image"]
    cmd = redis["command"]
    words = cmd.split() if isinstance(cmd, str) else list(cmd)
    assert words[0] == "redis-server"
    assert words[words.index("--appendonly") + 1] == "yes"
    assert any(":/data" in v for v in redis.get("volumes", [])), "redis /data is not on a volume"


@pytest.mark.parametrize("name", INFRA_SERVICES + LEARNER_SERVICES)
def test_every_long_running_service_has_a_healthcheck(name):
    service = _service(name)
    health = service.get("healthcheck") or {}
    if name in ONE_SHOT_SERVICES:
        assert service.get("restart") == "no", "a one-shot service must not be restarted"
        return
    assert health.get("test") and not health.get("disable"), f"{name} has no healthcheck"
    assert service.get("restart") in ("unless-stopped", "always", "on-failure")


@pytest.mark.parametrize("name", LEARNER_SERVICES)
def test_learner_services_run_the_image_built_from_the_dockerfile(name):
    service = _service(name)
    assert service.get("image") == LEARNER_IMAGE
    build = service.get("build")
    assert isinstance(build, dict), f"{name} does not build the learner image"
    assert build.get("dockerfile") == LEARNER_DOCKERFILE
    assert (ROOT / build.get("context", ".") / build["dockerfile"]).is_file()
    assert (ROOT / build.get("context", ".")).resolve() == ROOT.resolve()


def test_only_learner_services_build_or_get_learner_settings():
    for name, service in _compose()["services"].items():
        if name in LEARNER_SERVICES:
            continue
        assert "build" not in service, f"{name} is not a learner service but builds an image"
        assert not any(k.startswith(ENV_PREFIX) for k in _environment(service)), name


# --- settings ----------------------------------------------------------------


def test_every_stream_learner_variable_in_the_file_is_a_real_setting():
    real = {env_name(f) for f in FIELDS}
    mentioned = set(_SETTING_NAME.findall(COMPOSE_FILE.read_text()))
    assert mentioned, "the compose file configures nothing through the environment"
    unknown = sorted(mentioned - real)
    assert not unknown, f"not settings of stream_learner.config.Settings: {unknown}"


@pytest.mark.parametrize("name", LEARNER_SERVICES)
def test_interpolated_settings_read_the_variable_of_the_same_name(name):
    # `.env` / shell values must land in the setting the README names.
    for key, value in _environment(_service(name)).items():
        for m in _INTERPOLATION.finditer(value or ""):
            assert m.group("name") == key, f"{key} reads ${{{m.group('name')}}}"


@pytest.mark.parametrize("name", LEARNER_SERVICES)
def test_learner_environment_loads_as_settings(name):
    env = container_env(name)
    assert env, f"{name} gets no STREAM_LEARNER_* settings"
    settings = load_settings(env=env)
    assert settings.bootstrap_servers == "kafka:9092"
    assert settings.redis_url.startswith("redis://redis:")
    assert settings.security_protocol == "PLAINTEXT"
    assert settings.log_format == "json"


@pytest.mark.parametrize("name", LEARNER_SERVICES)
def test_secured_cluster_settings_pass_through(name):
    shell = {
        "STREAM_LEARNER_BOOTSTRAP_SERVERS": "b1.example:9096,b2.example:9096",
        "STREAM_LEARNER_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAM_LEARNER_SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAM_LEARNER_SASL_USERNAME": "learner",
        "STREAM_LEARNER_SASL_PASSWORD": "s3cret",
        "STREAM_LEARNER_SSL_CAFILE": "/certs/ca.pem",
        "STREAM_LEARNER_REDIS_URL": "rediss://cache.example:6380/0",
        "STREAM_LEARNER_REDIS_PASSWORD": "r3dis",
    }
    settings = load_settings(env=container_env(name, shell))
    assert settings.bootstrap_servers == shell["STREAM_LEARNER_BOOTSTRAP_SERVERS"]
    assert settings.security_protocol == "SASL_SSL"
    assert settings.sasl_mechanism == "SCRAM-SHA-512"
    assert (settings.sasl_username, settings.sasl_password) == ("learner", "s3cret")
    assert settings.ssl_cafile == "/certs/ca.pem"
    assert settings.redis_url == "rediss://cache.example:6380/0"
    assert settings.redis_password == "r3dis"


def test_bundled_endpoints_match_the_infra_services():
    kafka_env = _environment(_service("kafka"))
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split("://", 1)[1]
    for name in LEARNER_SERVICES:
        settings = load_settings(env=container_env(name))
        assert settings.bootstrap_servers == advertised
        assert settings.redis_url.split("://", 1)[1].split(":")[0] == "redis"


LONG_RUNNING = [n for n in LEARNER_SERVICES if n not in ONE_SHOT_SERVICES]


def _probe(name: str) -> list[str]:
    test = _service(name)["healthcheck"]["test"]
    assert test[0] == "CMD", f"{name}: the probe runs without a shell"
    return [str(t) for t in test[1:]]


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_healthcheck_probes_the_roles_health(name):
    # /health, not /metrics: a role that cannot make progress answers 503 there, while its metrics page
    # still answers. The serving node's own /health (its HTTP port) says whether it has a model to serve.
    settings = load_settings(env=container_env(name))
    port = settings.serving_port if name == "serving" else settings.metrics_port
    assert port is not None, f"{name} serves no /health for its healthcheck"
    probe = " ".join(_probe(name))
    assert f"http://localhost:{port}/health" in probe
    assert "/metrics" not in probe


@pytest.mark.slow
@pytest.mark.parametrize("name", LONG_RUNNING)
def test_the_healthcheck_fails_on_an_unhealthy_answer_and_passes_on_a_healthy_one(name):
    # The probe as compose runs it, against a real /health server that answers 503, then 200.
    from stream_learner.health import Health
    from stream_learner.local import free_port
    from stream_learner.metrics import Metrics

    now = [0.0]
    metrics = Metrics(roles=[], health=Health(stall_s=1, clock=lambda: now[0]))
    metrics.health.expect("role")
    port = free_port()
    server = metrics.serve(port, addr="127.0.0.1")
    argv = [re.sub(r"localhost:\d+", f"127.0.0.1:{port}", a) for a in _probe(name)]
    assert argv[0] == "python"
    argv[0] = sys.executable
    try:
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode != 0  # 503: unhealthy
        metrics.health.role("role").beat()
        ok = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_an_invalid_value_would_be_caught():
    # Guards the checks above against passing vacuously.
    with pytest.raises(ConfigError):
        load_settings(env={**container_env("joiner"), "STREAM_LEARNER_METRICS_PORT": "http"})
    with pytest.raises(ConfigError):
        load_settings(env={"STREAM_LEARNER_NO_SUCH_SETTING": "1"})


# --- commands and profiles ---------------------------------------------------


def test_roles_that_need_user_input_are_in_profiles():
    assert LEARNING_PROFILE in (_service("trainer").get("profiles") or [])
    assert {LEARNING_PROFILE, SERVING_PROFILE} <= set(_service("serving").get("profiles") or [])
    for name in ("topics", "joiner"):
        assert not _service(name).get("profiles"), f"{name} must start with a plain `up`"


@pytest.mark.parametrize("name", LEARNER_SERVICES)
def test_command_is_a_real_subcommand(name):
    cmd = _command(_service(name))
    choices = _subcommands()
    assert cmd[0] in choices, f"{name}: stream-learner has no sub-command {cmd[0]!r}"
    try:
        build_parser().parse_args(cmd)  # the whole command line parses
    except SystemExit:
        pytest.fail(f"{name}: `stream-learner {' '.join(cmd)}` does not parse")


def test_topics_service_creates_topics_after_kafka_is_healthy():
    topics = _service("topics")
    assert _command(topics)[:2] == ["topics", "create"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("joiner", "trainer", "serving"):
        dep = _service(name)["depends_on"]["topics"]
        assert dep["condition"] == "service_completed_successfully", name
    assert _service("joiner")["depends_on"]["redis"]["condition"] == "service_healthy"


# --- Dockerfile --------------------------------------------------------------


def test_dockerfile_base_entrypoint_and_user():
    instrs = _dockerfile_instructions()
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms and re.match(r"python:3\.11\.\d+-slim", froms[-1]), froms
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert entry and entry[-1] == '["stream-learner"]'
    env = " ".join(a for i, a in instrs if i == "ENV")
    assert re.search(r"PYTHONUNBUFFERED=1", env)


def test_dockerfile_installs_cpu_torch_before_the_project():
    runs = _runs()
    torch = [i for i, r in enumerate(runs) if TORCH_PIN in r.split()]
    project = [i for i, r in enumerate(runs) if _PIP_INSTALL_PROJECT.search(r)]
    assert torch, f"no RUN installs {TORCH_PIN}"
    assert project, "no RUN does `pip install .`"
    assert TORCH_CPU_INDEX in runs[torch[0]], "torch must come from the CPU index"
    assert torch[0] < project[0], "torch must be installed before the project"


def test_dockerfile_never_installs_the_dev_extra():
    for run in _runs():
        assert not re.search(r"\[[^\]]*\bdev\b[^\]]*\]", run), run
        assert "--extra dev" not in run, run


def test_pip_install_project_pattern():
    # The Dockerfile checks above rely on this matcher; keep it honest.
    assert _PIP_INSTALL_PROJECT.search("pip install .")
    assert _PIP_INSTALL_PROJECT.search("pip install --no-deps . && rm -rf build")
    assert _PIP_INSTALL_PROJECT.search("pip install .[text] && rm -rf build")
    assert not _PIP_INSTALL_PROJECT.search("pip install .venv/x.whl")
    assert not _PIP_INSTALL_PROJECT.search("pip install ./wheels/x.whl")


def test_dockerignore_keeps_local_state_out_of_the_image():
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", ".stream-learner", "bench/results"):
        assert required in patterns, f"{required} is not in .dockerignore"
    assert any("__pycache__" in p for p in patterns)
    for needed in ("pyproject.toml", "stream_learner", "docker", "."):
        assert needed not in patterns, f".dockerignore drops {needed}, which the build needs"


# --- secrets -----------------------------------------------------------------

PRIVATE_KEY, PUBLIC_KEY = "signing.pem", "signing.pub.pem"  # what `keys generate` writes


def _secret_files(name: str) -> dict[str, str]:
    """A service's compose secrets: the path inside the container -> the host file."""
    compose = _compose()
    out = {}
    for entry in _service(name).get("secrets") or []:
        source = entry if isinstance(entry, str) else entry["source"]
        target = source if isinstance(entry, str) else entry.get("target", source)
        path = target if target.startswith("/") else f"/run/secrets/{target}"
        out[path] = compose["secrets"][source]["file"]
    return out


def _bind_sources(name: str) -> list[str]:
    return [
        str(v).split(":")[0] if isinstance(v, str) else str(v.get("source", ""))
        for v in _service(name).get("volumes") or []
    ]


@pytest.mark.slow
def test_keys_generate_writes_the_files_compose_mounts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", "keys", "generate", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PRIVATE_KEY, PUBLIC_KEY])


def test_the_serving_node_gets_only_the_public_key():
    files = _secret_files("serving")
    assert files and all(Path(f).name == PUBLIC_KEY for f in files.values()), files
    assert not [s for s in _bind_sources("serving") if "secrets" in s], "serving mounts the secrets directory"
    keys = load_settings(env=container_env("serving")).serving_public_keys
    assert keys and set(keys) <= set(files), f"serving_public_keys {keys} are not its mounted secrets {files}"


def test_only_the_trainer_gets_the_private_key():
    for name in _compose()["services"]:
        files = _secret_files(name) if _service(name).get("secrets") else {}
        has_private = any(Path(f).name == PRIVATE_KEY for f in files.values())
        assert has_private == (name == "trainer"), name
        assert not [s for s in _bind_sources(name) if "secrets" in s], f"{name} mounts the secrets directory"
    signing_key = load_settings(env=container_env("trainer")).trainer_signing_key
    assert signing_key in _secret_files("trainer") and Path(_secret_files("trainer")[signing_key]).name == PRIVATE_KEY


def test_secrets_are_ignored_by_git_and_docker():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (f"secrets/{PRIVATE_KEY}", f"secrets/{PUBLIC_KEY}", PRIVATE_KEY, f"docker/{PRIVATE_KEY}"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert ignored.returncode == 0, f"git would commit {path}"
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"secrets", "**/*.pem", ".env"} <= patterns


def test_the_image_copies_only_what_the_package_is_built_from():
    # `COPY . .` would put secrets/ (or anything else lying in the checkout) into the image.
    copies = [a.split() for i, a in _dockerfile_instructions() if i in ("COPY", "ADD")]
    sources = [src for args in copies for src in [a for a in args if not a.startswith("--")][:-1]]
    assert sources and set(sources) <= {"pyproject.toml", "README.md", "stream_learner"}, sources


# --- the serving profile ------------------------------------------------------


def test_the_serving_service_cold_starts_only_when_asked():
    assert build_parser().parse_args(_command(_service("serving"))).serving_cold_start is None
    assert load_settings(env=container_env("serving")).serving_cold_start is False
    asked = container_env("serving", {"STREAM_LEARNER_SERVING_COLD_START": "true"})
    assert load_settings(env=asked).serving_cold_start is True


@pytest.mark.slow
def test_the_serving_service_serves_an_existing_deployment(settings, keypair, tmp_path):
    """The compose `serving` service, as `--profile serving` runs it for a deployment with checkpoints."""
    import http.client
    import json
    import time

    from cryptography.hazmat.primitives import serialization

    from stream_learner.bus import make_producer
    from stream_learner.local import free_port

    from .serving.conftest import MODEL, publish

    producer = make_producer(settings)
    publish(producer, settings.topic_models, keypair[0], 2)
    producer.close()
    # Only the model's name comes from the shell: its features are the trainer's business.
    env = container_env("serving", {"STREAM_LEARNER_TRAINER_MODEL": MODEL})
    public = tmp_path / PUBLIC_KEY  # what compose mounts at the serving_public_keys path
    public.write_bytes(
        keypair[1].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    port = free_port()
    env.update(
        {
            "STREAM_LEARNER_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "STREAM_LEARNER_REDIS_URL": settings.redis_url,
            "STREAM_LEARNER_TOPIC_MODELS": settings.topic_models,
            "STREAM_LEARNER_TOPIC_PREDICTIONS": settings.topic_predictions,
            "STREAM_LEARNER_SERVING_PUBLIC_KEYS": str(public),
            "STREAM_LEARNER_SERVING_HOST": "127.0.0.1",
            "STREAM_LEARNER_SERVING_PORT": str(port),
            "STREAM_LEARNER_METRICS_PORT": str(free_port()),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", *_command(_service("serving"))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health is None:
            assert proc.poll() is None, (proc.stdout.read() if proc.stdout else b"").decode()[-3000:]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                resp = conn.getresponse()
                if resp.status == 200:
                    health = json.loads(resp.read())
                conn.close()
            except OSError:
                pass
            time.sleep(0.2)
        assert health is not None and health["version"] == 2 and health["model"] == MODEL
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
