"""The README stays true: every setting documented, the two commands wired to CI."""

from __future__ import annotations

import re
from pathlib import Path

from stream_learner.config import FIELDS
from stream_learner.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z0-9_]+)`", table))
    assert set(FIELDS) - documented == set()


def test_every_metric_is_documented() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    missing = {n for n in names if n not in README and n.removesuffix("_total") not in README}
    assert missing == set()


def test_the_two_commands_exist_and_ci_runs_the_test_command() -> None:
    assert "./dev.sh demo" in README and "./dev.sh test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev.sh test" in ci
