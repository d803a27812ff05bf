"""The README documents what the code does: its settings table and its two set-up commands."""
import os
import re
from pathlib import Path

from tvforge.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_setting_is_in_the_readme_table_and_nothing_else():
    documented = set(re.findall(r"^\| `(TVFORGE_[A-Z0-9_]+)` \|", README, flags=re.MULTILINE))
    assert documented == {f"TVFORGE_{name.upper()}" for name in Settings.model_fields}


def test_the_quickstart_commands_exist_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quickstart.strip().splitlines()]
    assert commands == ["scripts/up", "scripts/test"]
    for command in commands:
        assert os.access(REPO / command, os.X_OK)
    assert "scripts/test" in (REPO / ".ci/run").read_text()
