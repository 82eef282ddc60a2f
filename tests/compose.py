"""docker-compose.yml read as `docker compose` reads it, for tests on machines without Docker.

    spec = load_compose(env)        # parsed, with ${VAR}, ${VAR:-x}, ${VAR:?msg}, ${VAR:+x} applied
    spec["services"]["mlflow"]["command"]

Interpolation follows the compose specification: `:-` and `:?` treat an empty variable as unset,
`-` and `?` only an unset one; `$$` is a literal dollar. Comments are not interpolated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml

COMPOSE_FILE = Path(__file__).parents[1] / "docker-compose.yml"
VARIABLE = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>(?:[^{}]|\{[^{}]*\})*))?\}|(?P<bare>\w+))"
)


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is not set: compose refuses to start."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        if match["dollar"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-"):
            return interpolate(arg, env) if unset else value
        if op in ("?", ":?"):
            if unset:
                raise MissingVariable(f"required variable {name} is missing a value: {interpolate(arg, env)}")
            return value
        if op in ("+", ":+"):
            return "" if unset else interpolate(arg, env)
        return value or ""

    return VARIABLE.sub(substitute, text)


def _walk(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, env) for value in node]
    return node


def load_compose(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict:
    """The compose file with every variable interpolated from ``env``.

    Raises:
        MissingVariable: a required variable is unset (``docker compose up`` would refuse too).
    """
    return _walk(yaml.safe_load(path.read_text()), env)
