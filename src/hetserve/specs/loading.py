"""Read YAML/JSON spec files into typed models, turning every failure into one clear message.

Every file a user names is read through ``read_text``: it must be a regular file (a FIFO, a device or a
directory would block or never end), no larger than its kind's cap (checked before reading) and UTF-8.
YAML and JSON are parsed with a bound on nesting depth and on the number of values (aliases count as
the values they repeat), so no file can exhaust the stack or the memory of whoever loads it.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import HetserveError, suggest

M = TypeVar("M", bound=BaseModel)

#: Largest spec file (plan, cluster, workload, scenario, config.json) read, in bytes.
MAX_SPEC_BYTES = 4 * 1024 * 1024
#: Deepest nesting of lists and mappings a spec file may have.
MAX_DEPTH = 32
#: Most values (scalars, lists and mappings; an alias counts as everything it repeats) in one spec file.
MAX_VALUES = 1_000_000
#: Most validation errors one message lists (the rest are counted).
MAX_LISTED_ERRORS = 20

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_text(path, what: str = "file", limit: int = MAX_SPEC_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes, or one HetserveError naming it."""
    if not isinstance(path, (str, os.PathLike)):  # a packaged resource (importlib Traversable)
        return _decode(path.read_bytes(), path, what)
    with open_regular(path, what, limit) as fh:
        try:
            data = fh.read(limit + 1)  # the file may have grown since it was checked
        except OSError as exc:
            raise HetserveError(f"cannot read the {what}: {exc.strerror}", source=str(path)) from None
    if len(data) > limit:
        raise HetserveError(f"the {what} is larger than the {_size(limit)} a {what} may be", source=str(path))
    return _decode(data, path, what)


def read_json_object(path, what: str = "JSON file", limit: int = MAX_SPEC_BYTES) -> dict:
    """The JSON object (a mapping at the top) of a regular file, or one HetserveError naming the file."""
    text = read_text(path, what, limit)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HetserveError(
            f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", source=str(path)
        ) from None
    except RecursionError:
        raise HetserveError("is nested too deeply", source=str(path)) from None
    if not isinstance(value, dict):
        raise HetserveError(
            f"must hold a JSON object ({{...}}) at the top, not {type(value).__name__}", source=str(path)
        )
    return value


def open_regular(path, what: str, limit: int) -> io.BufferedReader:
    """``path`` opened for binary reading if it is a regular file of at most ``limit`` bytes; a missing
    file, a directory, a FIFO, a device or a socket is one HetserveError naming the path. The file is
    opened without blocking and checked through the open descriptor, so nothing waits on a FIFO."""
    p = str(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise HetserveError(f"{what} not found; check the path", source=p) from None
    except IsADirectoryError:
        raise HetserveError(f"is a directory, expected a {what}", source=p) from None
    except OSError as exc:
        raise HetserveError(f"cannot open the {what}: {exc.strerror}", source=p) from None
    except ValueError:  # a NUL byte in the path
        raise HetserveError(f"is not a valid path of a {what}", source=show_value(p)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise HetserveError(f"is a directory, expected a {what}", source=p)
        if not stat.S_ISREG(st.st_mode):
            kind = _file_kind(st.st_mode)
            raise HetserveError(f"is {kind}, not a regular file; give the path of a {what}", source=p)
        if st.st_size > limit:
            raise HetserveError(
                f"the {what} is {_size(st.st_size)}, larger than the {_size(limit)} a {what} may be",
                source=p,
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(data: bytes, where, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise HetserveError(
            f"the {what} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} (byte offset "
            f"{exc.start}) cannot be decoded; save it as UTF-8",
            source=str(where),
        ) from None


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def parse_text(text: str, source: str, json_syntax: bool = False) -> Any:
    """Parse YAML (or JSON) text within ``MAX_DEPTH`` and ``MAX_VALUES``; errors name ``source``."""
    try:
        if json_syntax:
            data = json.loads(text)
            _check_shape(data, source)
            return data
        _check_events(text, source)
        return yaml.load(text, Loader=_SafeLoader)  # a safe loader (CSafeLoader when built)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in problem:  # PyYAML's own bound (6.0.4 and later), met before ours
            raise HetserveError(f"nested more than {MAX_DEPTH} levels deep{where}", source=source) from None
        raise HetserveError(f"invalid YAML{where}: {problem}", source=source) from None
    except json.JSONDecodeError as exc:
        raise HetserveError(f"invalid JSON at line {exc.lineno}: {exc.msg}", source=source) from None
    except RecursionError:
        raise HetserveError(f"nested more than {MAX_DEPTH} levels deep", source=source) from None
    except ValueError as exc:  # an integer of more digits than Python converts
        what = "a number has too many digits" if "digits" in str(exc) else _one_line(str(exc))
        raise HetserveError(f"a value cannot be read: {what}", source=source) from None


def _check_events(text: str, source: str) -> None:
    """Walk the YAML event stream (no objects built): refuse nesting deeper than ``MAX_DEPTH`` and more
    than ``MAX_VALUES`` values, counting each alias as the values of the node it repeats."""
    depth = 0
    total = 0
    sizes: dict[str, int] = {}
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, values before it) of each open collection
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise HetserveError(
                    f"nested more than {MAX_DEPTH} levels deep (at line {line}); a spec file is a few "
                    "levels of mappings and lists",
                    source=source,
                )
            open_nodes.append((event.anchor, total))
            total += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, before = open_nodes.pop()
            if anchor:
                sizes[anchor] = total - before
        if total > MAX_VALUES:
            raise HetserveError(
                f"holds more than {MAX_VALUES:,} values (aliases count as what they repeat); a spec "
                "file is far smaller",
                source=source,
            )


def _check_shape(data: Any, source: str) -> None:
    """The bounds of ``_check_events`` for already parsed data (JSON), walked without recursion."""
    total = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        total += 1
        if total > MAX_VALUES:
            raise HetserveError(f"holds more than {MAX_VALUES:,} values", source=source)
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise HetserveError(f"nested more than {MAX_DEPTH} levels deep", source=source)
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_mapping(path, what: str = "file") -> dict[str, Any]:
    """Parse a YAML (or JSON, by its ``.json`` suffix) file that must hold a mapping."""
    source = str(path)
    text = read_text(path, what)
    data = parse_text(text, source, json_syntax=Path(str(path)).suffix == ".json")
    if data is None:
        raise HetserveError(f"the {what} is empty", source=source)
    if not isinstance(data, dict):
        raise HetserveError(
            f"the {what} must be a mapping of keys to values, got a {type(data).__name__}", source=source
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
    errors = exc.errors()
    lines = []
    for err in errors[:MAX_LISTED_ERRORS]:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = _one_line(_field_path(loc), 120)
        if prefix:
            field = prefix if field == "(top level)" else f"{prefix}.{field}"
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            key = _one_line(str(loc[-1]), 60)
            hint = suggest(key, known)
            msg = (
                f"unknown key '{key}'{hint}; allowed keys: {', '.join(known)}"
                if known
                else f"unknown key '{key}'"
            )
        elif kind == "missing":
            msg = "is required"
        elif kind in ("literal_error", "enum"):
            msg = f"{err['msg'].lower()}, got {show_value(err.get('input'))}"
        else:
            # pydantic's own text may quote the user's value (a union's tag): kept to one line
            msg = _one_line(err["msg"].removeprefix("Value error, "), 300)
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {show_value(err['input'])})"
        lines.append(f"{field}: {msg}")
    more = len(errors) - len(lines)
    return HetserveError(list_mistakes(lines, more), source=source)


def list_mistakes(mistakes: list[str], unlisted: int = 0) -> str:
    """Several mistakes in one file as one message: the first ``MAX_LISTED_ERRORS``, '; '-joined, then
    '... and N more' for the rest (and for ``unlisted`` ones not given)."""
    shown = mistakes[:MAX_LISTED_ERRORS]
    more = len(mistakes) - len(shown) + unlisted
    return "; ".join(shown + ([f"... and {more} more"] if more > 0 else []))


def show_value(value: Any, limit: int = 60) -> str:
    """A short, one-line repr of a user's value (a 5,000-digit integer or a long string is cut)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"a number of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, float) and not math.isfinite(value):
        return {"inf": ".inf", "-inf": "-.inf"}.get(repr(value), ".nan")
    return _one_line(repr(value), limit)


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
    """A spec file read (``read_mapping``) and validated against ``model``: one HetserveError on any
    failure, listing every field that is wrong."""
    data = read_mapping(path, what)
    return validate(model, data, source=str(path))
