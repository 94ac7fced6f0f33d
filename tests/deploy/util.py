"""Shared helpers of the export tests: every example plan, exported in memory."""

from __future__ import annotations

from functools import cache

from hetserve.deploy.export import build
from hetserve.errors import HetserveError
from hetserve.plan import load_plan

from ..conftest import EXAMPLES

PLANS = sorted((EXAMPLES / "plans").glob("*.yaml")) + sorted((EXAMPLES / "serve").glob("*.yaml"))
SMOLLM2 = sorted((EXAMPLES / "serve").glob("smollm2-*.yaml"))


@cache
def deployment(path):
    return load_plan(path)


@cache
def exported(path, target: str, engine: str | None = None):
    """(export, refused message or None): the plan as is when the target expresses it, else --nearest."""
    dep = deployment(path)
    try:
        return build(dep, target, engine), None
    except HetserveError as exc:
        return build(dep, target, engine, use_nearest=True), str(exc)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None
