"""Read YAML/JSON spec files into typed models, turning every failure into one clear message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import HetserveError, suggest

M = TypeVar("M", bound=BaseModel)


def read_mapping(path, what: str = "file") -> dict[str, Any]:
    """Parse a YAML (or JSON) file that must hold a mapping."""
    p = Path(str(path))
    try:
        text = p.read_text() if isinstance(path, (str, Path)) else path.read_text()
    except FileNotFoundError:
        raise HetserveError(f"{what} not found; check the path", source=str(p)) from None
    except IsADirectoryError:
        raise HetserveError(f"{p} is a directory, expected a {what}") from None
    except OSError as exc:
        raise HetserveError(f"cannot read {what} {p}: {exc.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HetserveError(f"invalid YAML{where}: {problem}", source=str(p)) from None
    except json.JSONDecodeError as exc:
        raise HetserveError(f"invalid JSON at line {exc.lineno}: {exc.msg}", source=str(p)) from None
    if data is None:
        raise HetserveError(f"the {what} is empty", source=str(p))
    if not isinstance(data, dict):
        raise HetserveError(
            f"the {what} must be a mapping of keys to values, got a {type(data).__name__}", source=str(p)
        )
    return data


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def explain_validation(
    exc: ValidationError, model: type[BaseModel], source: str | None, prefix: str = ""
) -> HetserveError:
    """One message for a pydantic error: the field, what is wrong, what is allowed."""
    lines = []
    for err in exc.errors()[:5]:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = _field_path(loc)
        if prefix:
            field = prefix if field == "(top level)" else f"{prefix}.{field}"
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            hint = suggest(loc[-1], known)
            msg = (
                f"unknown key '{loc[-1]}'{hint}; allowed keys: {', '.join(known)}"
                if known
                else f"unknown key '{loc[-1]}'"
            )
        elif kind == "missing":
            msg = "is required"
        elif kind in ("literal_error", "enum"):
            msg = f"{err['msg'].lower()}, got {err.get('input')!r}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        lines.append(f"{field}: {msg}")
    more = len(exc.errors()) - len(lines)
    if more > 0:
        lines.append(f"... and {more} more")
    return HetserveError("; ".join(lines), source=source)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested pydantic model class at a location path, if it can be found."""

    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _inner_model(annotation):
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def validate(model: type[M], data: Any, source: str | None = None, prefix: str = "") -> M:
    """``model.model_validate(data)``, with a failure explained as one HetserveError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise explain_validation(exc, model, source, prefix) from None


def load_yaml_model(model: type[M], path, what: str = "file") -> M:
    data = read_mapping(path, what)
    return validate(model, data, source=str(path))
