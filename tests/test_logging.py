"""Logs: one renderer for ours and the libraries' records, credentials masked in every line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import structlog

from stream_learner.logging import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h).__name__ == "_StderrHandler"]:
        root.removeHandler(handler)


@pytest.mark.slow
def test_kafka_pythons_own_records_are_json_lines_in_a_json_log() -> None:
    # No broker on port 1: kafka-python logs its connection errors itself, through the stdlib.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_learner.cli",
            "topics",
            "create",
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while len(lines) < 4 and time.monotonic() < deadline:
            lines.append(proc.stderr.readline())
    finally:
        proc.kill()
        proc.wait()
    records = [json.loads(line) for line in lines]  # every line is JSON, none plain text
    assert all(r["logger"].startswith("kafka.") for r in records), records
    assert {r["level"] for r in records} <= {"warning", "error"} and all(r["timestamp"] for r in records)


def test_library_records_and_ours_share_the_renderer_and_mask_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    configure_logging("info", "json")  # configuring twice adds no second handler
    logging.getLogger("redis.connection").warning("cannot connect to %s", "redis://app:hunter2@cache:6379/0")
    logging.getLogger("kafka.conn").info("chatty")  # libraries stay at WARNING and above
    structlog.get_logger("stream_learner").warning("dependency_down", url="rediss://:hunter2@cache:6380/0")
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        logging.getLogger("redis").exception("gave up")
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == [
        "cannot connect to redis://app:***@cache:6379/0",
        "dependency_down",
        "gave up",
    ]
    assert records[0]["logger"] == "redis.connection" and records[0]["level"] == "warning"
    assert records[1]["url"] == "rediss://:***@cache:6380/0"
    assert "ConnectionError: refused" in records[2]["exception"]
    assert "hunter2" not in "".join(lines)
