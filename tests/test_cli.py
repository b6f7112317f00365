from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stream_learner.cli import main


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
    up = subprocess.run([sys.executable, "-m", "stream_learner.cli", "local", "up", "--state-file", str(state)],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    assert "STREAM_LEARNER_BOOTSTRAP_SERVERS=127.0.0.1:" in up.stdout
    recorded = json.loads(state.read_text())
    import redis

    assert redis.Redis.from_url(recorded["redis_url"]).ping()
    down = subprocess.run([sys.executable, "-m", "stream_learner.cli", "local", "down", "--state-file", str(state)],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not state.exists()


@pytest.mark.slow
def test_smoke_counts_end_to_end() -> None:
    out = subprocess.run([sys.executable, "-m", "stream_learner.cli", "smoke", "--events", "2000"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["lost"] == 0 and summary["decoded"]["prediction"] == 2000
    assert summary["examples_joined"] == summary["examples_expected"]
    assert sum(summary["dead_letters"].values()) == 5


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
