"""The OpenAI-compatible request bodies, their validation, and the error format.

Request bodies are validated strictly: a field of the wrong JSON type (``"max_tokens": "5"``,
``"temperature": true``) or an unknown field is an error, as with the OpenAI API. Every user mistake
becomes an ``APIError`` that the server returns as ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status.

hetserve extensions (accepted by both endpoints): ``top_k`` (0 = off), ``ignore_eos`` (keep generating
past end-of-sequence tokens until ``max_tokens``) and ``stop_token_ids``.

``parse_body`` refuses, before any field is looked at, what ``json.loads`` would take but no client
means: ``NaN``/``Infinity`` and numbers beyond a float, integers of more than 4300 digits, invalid
UTF-8, strings holding a lone UTF-16 surrogate (``"\\ud800"``) and structures nested more than
``MAX_DEPTH`` deep.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema


class APIError(Exception):
    """A request the server refuses; rendered as an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: Deepest nesting of arrays and objects a request body may have (the deepest valid one has 4).
MAX_DEPTH = 32
#: Stop strings a request may give, and the longest one (every stop string is searched for after every
#: token, and the last ``longest - 1`` characters are held back from the stream).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
#: ``seed``: what a 64-bit random generator takes, signed or unsigned.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_NAME_CHARS = 1024  # ``model`` and ``user``


_Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _Only(values: list) -> WithJsonSchema:
    """The documented schema of an OpenAI option this server does not implement: the values it takes
    (others are refused with a 400 naming the option, by ``check_supported``)."""
    return WithJsonSchema({"enum": values, "default": values[0]})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(max_length=MAX_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: Annotated[int, _Only([1])] = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _Stop | Annotated[list[_Stop], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: Annotated[float, _Only([0])] = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: Annotated[float, _Only([0])] = Field(default=0.0, ge=-2, le=2)
    logit_bias: Annotated[dict[str, float] | None, _Only([None, {}])] = None
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # hetserve extensions
    top_k: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    #: vLLM's field for a disaggregated prefill/decode hand-off (what ``hetserve route`` sends a P/D plan's
    #: backends): accepted and ignored, as this server has no KV connector (a decode request computes its
    #: prompt again).
    kv_transfer_params: dict[str, Any] | None = None

    def check_supported(self) -> None:
        """Refuse OpenAI options this server does not implement (rather than silently ignoring them)."""
        if self.n != 1:
            raise APIError(
                400, "n: only n=1 is supported; send separate requests for several samples", param="n"
            )
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise APIError(400, f"{name}: penalties are not supported; omit it or send 0", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported; omit it", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Annotated[bool, _Only([False])] = False
    logprobs: Annotated[int | None, _Only([None])] = None
    best_of: Annotated[int | None, _Only([None, 1])] = Field(default=None, ge=1)
    suffix: Annotated[str | None, _Only([None, ""])] = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, value, ok in (
            ("echo", self.echo, not self.echo),
            ("logprobs", self.logprobs, self.logprobs is None),
            ("best_of", self.best_of, self.best_of in (None, 1)),
            ("suffix", self.suffix, not self.suffix),
        ):
            if not ok:
                raise APIError(400, f"{name}={value!r} is not supported; omit it", param=name)
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt: the list of prompts is empty", param="prompt")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Other keys (name, tool_call_id, ...) are passed to the chat template as they are.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = "".join(p.text for p in self.content)
        d.setdefault("content", "")
        return d


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Annotated[bool, _Only([False])] = False
    top_logprobs: Annotated[int | None, _Only([None])] = None
    tools: Annotated[list[Any] | None, _Only([None, []])] = None
    tool_choice: Annotated[Any, _Only([None, "none"])] = None
    parallel_tool_calls: bool | None = None
    response_format: Annotated[
        dict[str, Any] | None,
        WithJsonSchema({"anyOf": [{"type": "null"}, {"const": {"type": "text"}}], "default": None}),
    ] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs is not None:
            raise APIError(
                400, "logprobs are not supported; omit logprobs and top_logprobs", param="logprobs"
            )
        if self.tools or self.tool_choice not in (None, "none"):
            raise APIError(
                400, "tools are not supported by this server; omit tools and tool_choice", param="tools"
            )
        if self.response_format is not None and self.response_format != {"type": "text"}:
            raise APIError(
                400, 'response_format: only {"type": "text"} is supported', param="response_format"
            )
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise APIError(
                400,
                "max_tokens and max_completion_tokens disagree; send one of them",
                param="max_completion_tokens",
            )

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-plain"}


def _is_tag(p: Any) -> bool:
    """A union-member tag pydantic puts in an error's location (``str``, ``list[int]``, ...)."""
    return isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p.startswith("constrained-"))


def _param(loc: tuple) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages.0.content`` (drops union-member tags)."""
    return ".".join(str(p) for p in loc if not _is_tag(p))


def _form(tag: str) -> str:
    return tag.replace("constrained-", "")


def _got(value: Any) -> str:
    return json.dumps(value, default=str)[:60]


class _BadNumber(ValueError):
    pass


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:20]} is beyond the range of a double")
    return value


def _no_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a JSON value")


def _check_tree(data: Any) -> None:
    """Refuse nesting beyond ``MAX_DEPTH`` and strings (values or keys) that are not valid Unicode
    (a lone surrogate from a ``\\ud800`` escape). Iterative: a deep body cannot exhaust the stack."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise APIError(
                400, f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, (*path, "<key>"))
                if isinstance(item, (str, dict, list)):
                    stack.append((item, (*path, key), depth + 1))
        else:
            for i, item in enumerate(value):
                if isinstance(item, (str, dict, list)):
                    stack.append((item, (*path, i), depth + 1))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        param = ".".join(str(p) for p in path if p != "<key>") or None
        raise APIError(
            400,
            f"{param or 'the request body'}: a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
            "escape), which is not a character",
            param=param,
            code="invalid_value",
        ) from None


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        message = f"the request body is not valid JSON: {exc}"
    except UnicodeDecodeError:
        message = "the request body is not valid JSON: it is not UTF-8 text"
    except _BadNumber as exc:
        message = f"the request body is not valid JSON: {exc}"
    except ValueError:  # an integer of more digits than Python converts
        message = "the request body is not valid JSON: an integer has too many digits"
    except RecursionError:
        message = f"the request body is nested more than {MAX_DEPTH} levels deep"
    raise APIError(400, message, code="invalid_json")


def parse_body(raw: bytes, model: type[_Strict]):
    """Decode and validate a JSON request body; APIError(400) naming the offending field otherwise."""
    data = _decode(raw)
    if not isinstance(data, dict):
        raise APIError(
            400, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json"
        )
    _check_tree(data)
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None
    request.check_supported()
    return request


def _validation_error(errors: list[dict]) -> APIError:
    """One APIError for pydantic's errors: the first field's; within a union (``stop``: a string or a list),
    the error of the form the value has, else the forms it accepts."""
    first = errors[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        message = f"{param}: unknown field; it is not a parameter of this endpoint"
    elif first["type"] == "missing":
        message = f"{param}: this field is required"
    else:
        same = [e for e in errors if _param(e["loc"]).startswith(param)]
        # in a union, the member of the value's type reports a bound or an item; the others a type mismatch
        specific = [e for e in same if not e["type"].endswith("_type")]
        if len(same) > 1 and specific:
            first, param = specific[0], _param(specific[0]["loc"])
            message = f"{param}: {first['msg']} (got {_got(first.get('input'))})"
        elif len(same) > 1:
            forms = dict.fromkeys(_form(str(p)) for e in same for p in e["loc"] if _is_tag(p))
            got = _got(first.get("input"))
            message = f"{param}: expected one of {', '.join(forms) or 'the documented forms'} (got {got})"
        else:
            message = f"{param}: {first['msg']} (got {_got(first.get('input'))})"
    return APIError(400, message, param=param or None, code="invalid_value")
