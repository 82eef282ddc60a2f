"""Every `seal run` / `seal eval` command the guides show loads a valid config, as typed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from models.config import load_config

ROOT = Path(__file__).parents[2]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A command line in a code block or inline code: `seal run CONFIG ...` / `seal eval CONFIG POLICY ...`
COMMAND = re.compile(r"seal (run|eval) +(deployments/configs/\S+\.yaml)([^`#\n]*)")


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
    commands = []
    for guide in GUIDES:
        text = guide.read_text().replace("\\\n", " ")  # join shell line continuations
        for match in COMMAND.finditer(text):
            verb, config, rest = match.groups()
            words = shlex.split(rest)
            if verb == "eval":
                words = words[1:]  # the POLICY argument
            overrides = [word for word in words if "=" in word]
            commands.append((guide.relative_to(ROOT).as_posix(), " ".join(match.group(0).split()), config, overrides))
    return commands


COMMANDS = documented_commands()


def test_the_guides_show_commands_to_check():
    guides = {guide for guide, *_ in COMMANDS}
    assert {"README.md", "docs/unlabelled.md", "docs/fewshot.md", "docs/ray.md"} <= guides


@pytest.mark.parametrize(("guide", "command", "config", "overrides"), COMMANDS, ids=[c[1] for c in COMMANDS])
def test_documented_command_loads(guide, command, config, overrides):
    load_config(ROOT / config, overrides)
