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


def test_the_settings_reference_is_generated_from_the_field_docs() -> None:
    from stream_learner.cli_settings import settings_reference

    block = README.split("tests/test_readme.py checks it -->\n", 1)[1].split("<!-- end of the settings reference", 1)[0]
    assert block == settings_reference(), (
        "README's settings reference is stale: paste the output of "
        "python -c 'from stream_learner.cli_settings import settings_reference; print(settings_reference(), end=\"\")'"
    )


def test_every_metric_is_documented() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    missing = {n for n in names if n not in README and n.removesuffix("_total") not in README}
    assert missing == set()


def test_the_two_commands_exist_and_ci_runs_the_test_command() -> None:
    assert "./dev.sh demo" in README and "./dev.sh test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev.sh test" in ci
