"""The README stays true: its two commands exist in the Makefile and every setting is documented."""

import re
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_two_commands():
    block = README.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make serve", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert (ROOT / ".ci/run").read_text().strip().endswith("make test")


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"`WARN_{name}`" in README, f"WARN_{name} is missing from the README's settings table"
