"""The model's own tokenizer and chat template, from GGUF metadata or a Hugging Face directory.

GGUF files of byte-level BPE models (``tokenizer.ggml.model == "gpt2"``) carry the vocabulary, the
merges, token types and a pre-tokenizer name; a ``tokenizers`` BPE tokenizer is assembled from them.
A directory provides ``tokenizer.json`` (and ``tokenizer_config.json`` / ``chat_template.jinja`` for
the chat template). Chat templates are rendered with a sandboxed jinja2 environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ...specs.loading import read_json_object

Message = Mapping[str, Any]

# GGUF token types (llama.cpp's vocabulary attributes).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split patterns published with the model families' tokenizers.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf_pre_tokenizer(name: str | None) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for GGUF's ``tokenizer.ggml.pre`` name, and whether whole words skip merges."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if name in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if name == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ), False
    if name in ("llama-bpe", "llama3", "llama-v3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level]), True
    if name == "qwen2":
        split = pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level]), False
    raise ValueError(
        f"GGUF pre-tokenizer {name!r} is not supported (supported: default, gpt2, smollm, llama-bpe, qwen2)"
    )


@lru_cache(maxsize=8)
def _compile_template(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata (key -> value), a ``gguf_file.GGUFFile``'s ``meta``."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        pre, ignore_merges = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        bpe = models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=ignore_merges,
        )
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, kind in zip(tokens, types)
                if kind == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, kind in zip(tokens, types)
                if kind == _USER_DEFINED
            ]
        )
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=list(dict.fromkeys(int(e) for e in eos)),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face model directory holding ``tokenizer.json``."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json (only fast-tokenizer directories are supported)")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()

        def token_id(token: Any) -> int | None:
            text = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(text) if text else None

        eos: list[int] = []
        for source in (_read_json(path / "generation_config.json"), _read_json(path / "config.json")):
            value = source.get("eos_token_id")
            eos.extend(value if isinstance(value, list) else [] if value is None else [value])
        if token_id(cfg.get("eos_token")) is not None:
            eos.append(token_id(cfg.get("eos_token")))
        # tokenizer.json's post-processor already adds BOS where the model wants it.
        return cls(
            backend,
            bos_token_id=token_id(cfg.get("bos_token")),
            eos_token_ids=list(dict.fromkeys(int(e) for e in eos)),
            chat_template=template,
        )

    # ---- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets other Python threads run while it works (encode holds the GIL throughout: a
        # long prompt would stop a server's event loop even when tokenised on a worker thread)
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}]) per the model's template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        from jinja2 import TemplateError

        special = {
            name: self.token_text(i) if i is not None else ""
            for name, i in (
                ("bos_token", self.bos_token_id),
                ("eos_token", self.eos_token_ids[0] if self.eos_token_ids else None),
            )
        }
        try:
            return _compile_template(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **special, **variables
            )
        except TemplateError as exc:
            raise ValueError(f"chat template failed to render: {exc}") from exc

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template supplies any BOS/special tokens itself)."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object beside the tokenizer: {} when absent; a malformed one is an error."""
    return read_json_object(path, "tokenizer's JSON file") if path.is_file() else {}
