from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stream_learner.bus import kafka_options
from stream_learner.config import (
    FIELDS,
    SETTING_GROUPS,
    Settings,
    env_name,
    field_docs,
    group_of,
    load_settings,
    load_settings_with_origins,
)
from stream_learner.errors import ConfigError


def test_defaults_when_nothing_is_set() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.topics["predictions"] == "sl.predictions"


def test_precedence_flags_over_toml_over_env(tmp_path: Path) -> None:
    cfg = tmp_path / "sl.toml"
    cfg.write_text('metrics_port = 9200\n[redis]\nurl = "redis://toml:6379/0"\n[topic]\nlabels = "toml.labels"\n')
    env = {
        "STREAM_LEARNER_METRICS_PORT": "9100",
        "STREAM_LEARNER_REDIS_URL": "redis://env:6379/0",
        "STREAM_LEARNER_CLIENT_ID": "from-env",
    }
    s = load_settings(env=env, config_file=cfg, flags={"redis_url": "redis://flag:6379/0", "log_level": None})
    assert s.redis_url == "redis://flag:6379/0"  # flag beats TOML and env
    assert s.metrics_port == 9200  # TOML beats env
    assert s.topic_labels == "toml.labels"  # tables flatten into their prefix
    assert s.client_id == "from-env"  # env beats the default
    assert s.log_level == "info"  # a None flag does not override


def test_kafka_table_needs_no_prefix(tmp_path: Path) -> None:
    cfg = tmp_path / "sl.toml"
    cfg.write_text('[kafka]\nbootstrap_servers = "k1:9092,k2:9092"\n')
    assert load_settings(env={}, config_file=cfg).bootstrap_servers == "k1:9092,k2:9092"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"STREAM_LEARNER_METRICS_PORT": "99999"}, "metrics_port"),
        ({"STREAM_LEARNER_LOG_LEVEL": "loud"}, "log_level"),
        ({"STREAM_LEARNER_REDIS_URL": "http://x"}, "redis_url"),
        ({"STREAM_LEARNER_TOPIC_DLQ": "bad topic"}, "topic_dlq"),
        ({"STREAM_LEARNER_SECURITY_PROTOCOL": "KERBEROS"}, "security_protocol"),
        ({"STREAM_LEARNER_BOOTSTRAP_SERVER": "x:1"}, "STREAM_LEARNER_BOOTSTRAP_SERVER"),
    ],
)
def test_invalid_setting_is_named(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_settings(env=env)


def test_invalid_value_names_its_source(tmp_path: Path) -> None:
    cfg = tmp_path / "sl.toml"
    cfg.write_text("max_event_bytes = -1\n")
    with pytest.raises(ConfigError, match=r"max_event_bytes \(from config file .*sl.toml\)"):
        load_settings(env={}, config_file=cfg)
    with pytest.raises(ConfigError, match=r"unknown setting 'nope'"):
        cfg.write_text("nope = 1\n")
        load_settings(env={}, config_file=cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={}, config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        cfg.write_text("= =\n")
        load_settings(env={}, config_file=cfg)


def test_sasl_needs_mechanism_and_credentials() -> None:
    with pytest.raises(ConfigError, match="sasl_mechanism is required"):
        load_settings(env={"STREAM_LEARNER_SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(ConfigError, match="sasl_username and sasl_password"):
        load_settings(
            env={"STREAM_LEARNER_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "STREAM_LEARNER_SASL_MECHANISM": "PLAIN"}
        )


def test_security_settings_pass_through_to_kafka_python() -> None:
    s = load_settings(
        env={
            "STREAM_LEARNER_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAM_LEARNER_SASL_MECHANISM": "SCRAM-SHA-256",
            "STREAM_LEARNER_SASL_USERNAME": "svc",
            "STREAM_LEARNER_SASL_PASSWORD": "s3cret",
            "STREAM_LEARNER_SSL_CAFILE": "/etc/ca.pem",
            "STREAM_LEARNER_SSL_CHECK_HOSTNAME": "false",
        }
    )
    opts = kafka_options(s)
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("svc", "s3cret")
    assert opts["ssl_cafile"] == "/etc/ca.pem"
    assert opts["ssl_check_hostname"] is False
    assert s.redacted()["sasl_password"] == "***"


def test_plaintext_passes_no_ssl_options() -> None:
    opts = kafka_options(Settings(ssl_cafile="/etc/ca.pem"))
    assert "ssl_cafile" not in opts and opts["security_protocol"] == "PLAINTEXT"


def test_every_field_is_settable_from_its_env_variable() -> None:
    import msgspec

    defaults = msgspec.structs.asdict(Settings())
    for field in FIELDS:
        value = defaults[field]
        if value is None or value == []:
            continue
        if isinstance(value, list):
            text = ",".join(map(str, value))
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        assert getattr(load_settings(env={env_name(field): text}), field) == value, field


def test_passwords_inside_urls_are_masked_wherever_settings_are_shown() -> None:
    s = Settings(
        redis_url="redis://app:hunter2@cache:6379/0",
        redis_password="r3dis",
        sasl_password="s4sl",
        ssl_password="k3y",
        serving_public_keys=["/keys/a.pem"],
    )
    shown = s.redacted()
    assert shown["redis_url"] == "redis://app:***@cache:6379/0"
    assert shown["redis_password"] == shown["sasl_password"] == shown["ssl_password"] == "***"
    text = json.dumps(shown)
    assert not {"hunter2", "r3dis", "s4sl", "k3y"} & set(re.findall(r"\w+", text))
    assert shown["serving_public_keys"] == ["/keys/a.pem"]  # not secrets: shown as they are
    # A URL with a token for its user, or a password in the query, is masked too.
    assert (
        Settings(redis_url="rediss://t0ken@cache:6380/0?password=x").redacted()["redis_url"]
        == "rediss://***@cache:6380/0?password=***"
    )


@pytest.mark.parametrize("where", ["flag", "env"])
def test_configuration_errors_name_the_setting_but_not_its_credentials(where: str) -> None:
    bad = "http://app:hunter2@cache:6379/0"  # not a redis:// URL: refused, and echoed
    with pytest.raises(ConfigError) as err:
        if where == "flag":
            load_settings(env={}, flags={"redis_url": bad})
        else:
            load_settings(env={"STREAM_LEARNER_REDIS_URL": bad})
    message = str(err.value)
    assert "invalid setting redis_url" in message and "http://app:***@cache:6379/0" in message
    assert "hunter2" not in message


def test_every_setting_has_a_meaning_and_a_group() -> None:
    docs = field_docs()
    assert [f for f in FIELDS if not docs.get(f)] == []
    groups = {f: group_of(f) for f in FIELDS}  # raises for a setting in no group
    assert set(groups.values()) == set(SETTING_GROUPS)  # and no group is empty
    assert groups["trainer_features"] == "model" and groups["trainer_lr"] == "learning"
    assert "password" in docs["redis_password"] and "masked" in docs["redis_password"]


def test_origins_say_default_env_file_or_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "sl.toml"
    cfg.write_text("[joiner]\nwindow_ms = 5000\n")
    settings, origins = load_settings_with_origins(
        env={"STREAM_LEARNER_LOG_LEVEL": "debug", "STREAM_LEARNER_JOINER_WINDOW_MS": "7000"},
        config_file=cfg,
        flags={"metrics_port": "9100", "log_format": None},
    )
    assert settings.joiner_window_ms == 5000 and settings.metrics_port == 9100
    assert origins["log_level"] == "env STREAM_LEARNER_LOG_LEVEL"
    assert origins["joiner_window_ms"] == f"file {cfg}"  # the file beat the environment
    assert origins["metrics_port"] == "flag --metrics-port"
    assert origins["log_format"] == origins["redis_url"] == "default"
    assert set(origins) == set(FIELDS)


def test_the_variant_settings_reach_the_gate_and_the_student() -> None:
    from stream_learner.learn.build import learner_config
    from stream_learner.optimize.hook import gate_config

    settings = load_settings(
        env={},
        flags={
            "trainer_features": ["a", "b"],
            "trainer_variants": ["student"],
            "trainer_lr": 0.001,
            "trainer_student_lr": 0.004,
            "variant_latency_budget_s": 0.02,
        },
    )
    student = learner_config(settings).student
    assert student is not None and student.lr == 0.004
    assert gate_config(settings).latency_budget_s == 0.02
    # Unset: the student learns at the teacher's rate, the gate times for 0.3 s per batch size.
    defaults = load_settings(env={}, flags={"trainer_features": ["a"], "trainer_variants": ["student"]})
    assert learner_config(defaults).student.lr is None and gate_config(defaults).latency_budget_s == 0.3
