from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from stream_learner.cli import build_parser, main
from stream_learner.cli_settings import VERB_SETTINGS, verb_fields
from stream_learner.config import FIELDS, default_of, field_docs, flag_name


@pytest.fixture(autouse=True)
def _restore_logging():
    # main() configures structlog for the process; later tests must not log
    # into this test's captured (and then closed) stderr.
    yield
    import structlog

    structlog.reset_defaults()


def test_config_error_exits_2_and_names_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--metrics-port", "abc"]) == 2
    err = capsys.readouterr().err
    assert "metrics_port" in err and "flag --metrics-port='abc'" in err


def test_config_prints_effective_settings_masked(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("STREAM_LEARNER_REDIS_PASSWORD", "hunter2")
    assert main(["config", "--bootstrap-servers", "k:9092"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["bootstrap_servers"] == "k:9092"
    assert shown["redis_password"] == "***"


@pytest.mark.slow
def test_console_script_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "stream_learner.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "local" in out.stdout


@pytest.mark.slow
def test_local_up_and_down(tmp_path) -> None:
    state = tmp_path / "local.json"
    up = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", "local", "up", "--state-file", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 0, up.stderr
    assert "STREAM_LEARNER_BOOTSTRAP_SERVERS=127.0.0.1:" in up.stdout
    recorded = json.loads(state.read_text())
    import redis

    assert redis.Redis.from_url(recorded["redis_url"]).ping()
    down = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", "local", "down", "--state-file", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not state.exists()


@pytest.mark.slow
def test_smoke_counts_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", "smoke", "--events", "2000"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["lost"] == 0 and summary["decoded"]["prediction"] == 2000
    assert summary["examples_joined"] == summary["examples_expected"]
    assert sum(summary["dead_letters"].values()) == 5


@pytest.mark.slow
def test_verbs_that_do_not_train_or_serve_do_not_import_torch(tmp_path) -> None:
    # A fresh interpreter, as the console script starts: build the parser, run
    # `config`, `local down` and `keys generate`, and import the modules the joiner and topics
    # verbs run. Torch (and River) cost ~250 MB and most of a second at start-up.
    code = f"""
import sys
from stream_learner.cli import build_parser, main
build_parser()
assert main(["config"]) == 0
assert main(["local", "down", "--state-file", {str(tmp_path / "none.json")!r}]) == 0
assert main(["keys", "generate", "--out", {str(tmp_path / "keys")!r}]) == 0
import stream_learner.bus, stream_learner.join.joiner, stream_learner.local
print(sorted(m for m in ("torch", "river") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "[]"


def test_config_masks_a_password_inside_the_redis_url(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("STREAM_LEARNER_REDIS_URL", "redis://app:hunter2@cache:6379/0")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["redis_url"] == "redis://app:***@cache:6379/0" and "hunter2" not in out


def test_a_configuration_error_does_not_echo_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--redis-url", "http://app:hunter2@cache:6379/0"]) == 2
    err = capsys.readouterr().err
    assert "invalid setting redis_url" in err and "flag --redis-url='http://app:***@cache" in err
    assert "hunter2" not in err


def test_config_show_origin(capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path) -> None:
    cfg = tmp_path / "sl.toml"
    cfg.write_text('[redis]\nurl = "redis://:hunter2@file:6379/0"\n')
    monkeypatch.setenv("STREAM_LEARNER_LOG_LEVEL", "debug")
    assert main(["config", "--show-origin", "--config", str(cfg), "--metrics-port", "9100"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["log_level"] == {"value": "debug", "origin": "env STREAM_LEARNER_LOG_LEVEL"}
    assert shown["redis_url"] == {"value": "redis://:***@file:6379/0", "origin": f"file {cfg}"}
    assert shown["metrics_port"] == {"value": 9100, "origin": "flag --metrics-port"}
    assert shown["client_id"] == {"value": "stream-learner", "origin": "default"}


def _help(verb: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[verb].format_help().split())  # wrapping undone


# replay's own arguments live beside its implementation, which imports torch: seconds.
@pytest.mark.parametrize(
    "verb", [pytest.param(v, marks=pytest.mark.slow) if v == "replay" else v for v in VERB_SETTINGS]
)
def test_each_verbs_help_lists_only_the_settings_it_uses_with_meaning_and_default(verb: str) -> None:
    docs = field_docs()
    text, used = _help(verb), set(verb_fields(verb))
    squeezed = text.replace(" ", "")  # argparse also wraps at hyphens
    for field in FIELDS:
        flag = flag_name(field)
        if field in used:
            # Its flag, its meaning and its default, from the one description in config/settings.py.
            assert f"{flag} " in text or f"{flag}," in text, field
            described = f"{docs[field]} (default: {default_of(field) or 'unset'})"
            assert described.replace(" ", "") in squeezed, field
        else:
            assert not re.search(re.escape(flag) + r"\b(?!-)", text), field


def test_each_role_takes_the_settings_it_runs_on_and_nothing_else() -> None:
    joiner, serve = set(verb_fields("joiner")), set(verb_fields("serve"))
    assert {"redis_url", "joiner_window_ms", "bootstrap_servers", "metrics_port"} <= joiner
    assert not {f for f in joiner if f.startswith(("trainer_", "serving_", "replay_"))}
    assert {"serving_public_keys", "serving_cold_start", "trainer_features"} <= serve
    assert not {f for f in serve if f.startswith(("joiner_", "redis_"))} and "trainer_lr" not in serve
    assert set(verb_fields("config")) == set(FIELDS)
    assert len(_help("joiner")) < len(_help("config")) / 1.5


def test_a_setting_the_verb_does_not_use_is_refused_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--joiner-window-ms", "5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "`serve` does not use joiner_window_ms" in err and "stream-learner serve --help" in err


@pytest.mark.slow
def test_keys_generate_refuses_to_overwrite_existing_keys(tmp_path) -> None:
    cmd = [sys.executable, "-m", "stream_learner.cli", "keys", "generate", "--out", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    private, public = (tmp_path / "signing.pem").read_bytes(), (tmp_path / "signing.pub.pem").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert "Traceback" not in again.stderr and "already exist" in again.stderr
    assert str(tmp_path / "signing.pem") in again.stderr
    assert (tmp_path / "signing.pem").read_bytes() == private  # nothing replaced
    assert (tmp_path / "signing.pub.pem").read_bytes() == public
    # A lone public key is not overwritten either: it would no longer match the trainer's private key.
    (tmp_path / "signing.pem").unlink()
    lone = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert lone.returncode == 1 and (tmp_path / "signing.pub.pem").read_bytes() == public
    assert not (tmp_path / "signing.pem").exists()
    # A directory it cannot write to: one line too, no traceback.
    (tmp_path / "a-file").write_text("")
    blocked = subprocess.run([*cmd[:-1], str(tmp_path / "a-file" / "keys")], capture_output=True, text=True, timeout=60)
    assert blocked.returncode == 1 and "cannot write the keys" in blocked.stderr
    assert "Traceback" not in blocked.stderr


def _topics_named(settings, prefix: str) -> list[str]:
    from kafka import KafkaAdminClient

    from stream_learner.bus import kafka_options

    admin = KafkaAdminClient(**kafka_options(settings))
    try:
        return sorted(t for t in admin.list_topics() if t.startswith(prefix))
    finally:
        admin.close()


@pytest.mark.parametrize(
    "verb", ["joiner", pytest.param("trainer", marks=pytest.mark.slow), pytest.param("serve", marks=pytest.mark.slow)]
)
def test_a_role_stops_at_start_naming_the_topics_that_do_not_exist(servers, verb: str) -> None:
    import uuid

    import msgspec

    from stream_learner.config import settings_env

    prefix = f"missing{uuid.uuid4().hex[:8]}"
    s = msgspec.structs.replace(
        servers.settings, log_format="json", **{f"topic_{role}": f"{prefix}.{role}" for role in servers.settings.topics}
    )
    out = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", verb],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    failed = [json.loads(line) for line in out.stderr.splitlines() if '"failed"' in line]
    assert len(failed) == 1 and "do not exist" in failed[0]["error"], out.stderr[-2000:]
    read = {"joiner": "predictions", "trainer": "examples", "serve": "models"}[verb]
    assert f"{prefix}.{read}" in failed[0]["error"] and "stream-learner topics create" in failed[0]["error"]
    assert _topics_named(s, prefix) == []  # and nothing was created behind the operator's back


@pytest.mark.slow
def test_a_role_creates_missing_topics_when_told(servers) -> None:
    import signal
    import time
    import uuid

    import msgspec

    from stream_learner.config import settings_env

    prefix = f"created{uuid.uuid4().hex[:8]}"
    s = msgspec.structs.replace(
        servers.settings,
        create_topics=True,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        **{f"topic_{role}": f"{prefix}.{role}" for role in servers.settings.topics},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "joiner"],
        env=settings_env(s),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_topics_named(s, prefix)) < 4 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        # The joiner's four, not the trainer's model and drift topics.
        assert _topics_named(s, prefix) == sorted(f"{prefix}.{r}" for r in ("predictions", "labels", "examples", "dlq"))
        assert proc.poll() is None  # and it runs on them
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_serve_takes_an_alias_and_models_takes_its_actions() -> None:
    args = build_parser().parse_args(["serve", "--serving-alias", "champion"])
    assert args.serving_alias == "champion"
    args = build_parser().parse_args(["models", "rollback", "churn", "--to", "3", "--alias", "canary"])
    assert (args.action, args.names, args.to, args.alias) == ("rollback", ["churn"], 3, "canary")
    assert "serving_alias" not in verb_fields("models") and "trainer_signing_key" in verb_fields("models")
