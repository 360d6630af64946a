"""Tokenizers for serving: HF `tokenizer.json`, SentencePiece, and Llama 3 tiktoken.

Runs on serving hosts, so it imports neither torch nor transformers nor anything from the export
side; each backend library (`tokenizers`, `sentencepiece`, `tiktoken`) is imported only when a
tokenizer of that kind is loaded.

`info` is the manifest entry written by `export.tokenizer_files.copy_tokenizer`.

Streaming: `id_to_bytes(i)` gives the raw bytes one token stands for (special tokens: their text,
check `is_special`). Concatenating the bytes of the non-special tokens of a sequence and decoding as
UTF-8 gives `decode(ids)`, except that when `strip_leading_space` is true (SentencePiece-style
tokenizers that add a dummy prefix) the decoder drops one leading space of the whole text.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llamaforge.runtime.core.chat_template import ChatTemplateError, render_chat

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "load_tiktoken_ranks"]


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Common interface; see the backends below.

    Prompts are encoded by the checkpoint's own rules, as transformers' `AutoTokenizer(...)(text)`
    encodes them: `encode(text)` adds the special tokens the tokenizer adds (its BOS, and its EOS
    where it says so), which for a tokenizer without a BOS rule is none. A text that already
    starts with BOS (as chat templates write it) never gets a second one.
    """

    kind: str = ""
    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]  # the stop set: every end-of-sequence id the checkpoint names
    strip_leading_space: bool = False
    chat_template: str | None = None  # the checkpoint's Jinja2 chat template, if it has one
    special_token_strings: dict[str, str]  # {"bos_token": "<s>", ...}: what a chat template sees

    def encode(self, text: str, add_bos: bool = True, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. `add_bos`: add the special tokens the tokenizer's own rules add
        (tokenizer.json post-processor; add_bos_token / add_eos_token), never a second BOS;
        False: none. Special-token text in `text` (e.g. "</s>") is tokenised as plain text unless
        `allow_special`."""
        raise NotImplementedError

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
        """The prompt text the checkpoint's chat template renders for `messages` (the semantics of
        transformers' `apply_chat_template(..., tokenize=False)`)."""
        if self.chat_template is None:
            raise ChatTemplateError("this tokenizer has no chat template (no chat_template in its tokenizer_config.json "
                                    "or chat_template.jinja)")
        return render_chat(self.chat_template, messages, self.special_token_strings,
                           add_generation_prompt=add_generation_prompt, tools=tools, **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> list[int]:
        """Ids of the rendered chat: special-token text is special, and nothing is added that the
        template did not write (as transformers' `apply_chat_template(..., tokenize=True)`)."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **variables)
        return self.encode(text, add_bos=False, allow_special=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def id_to_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def consumes_leading_space(self, token_id: int) -> bool:
        """Whether `decode` drops a leading space of this token when it starts the text (only
        meaningful where `strip_leading_space`): decoders that strip the decoded text drop any."""
        return True

    def is_special(self, token_id: int) -> bool:
        raise NotImplementedError

    def _with_specials(self, ids: list[int], add: bool, add_bos_token: bool, add_eos_token: bool) -> list[int]:
        """`ids` with BOS / EOS as the flags say (when `add`); no BOS before a BOS already there."""
        if not add:
            return ids
        if add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        if add_eos_token and self.eos_ids:
            ids = [*ids, self.eos_ids[0]]
        return ids

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")


def _read_config(path: Path | None) -> dict[str, Any]:
    """tokenizer_config.json as a dict ({} when there is none)."""
    if path is None or not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(cfg: dict[str, Any], template_path: Path | None) -> str | None:
    """The chat template: chat_template.jinja where there is one (transformers gives it priority),
    else tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default")."""
    if template_path is not None and template_path.is_file():
        return template_path.read_text(encoding="utf-8")
    value = cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _special_strings(cfg: dict[str, Any], defaults: Mapping[str, str | None]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(cfg[key]) if key in cfg else defaults.get(key)
        if text is not None:
            out[key] = text
    return out


def _union(*groups: Iterable[int | None]) -> tuple[int, ...]:
    out: list[int] = []
    for group in groups:
        for i in group:
            if i is not None and int(i) not in out:
                out.append(int(i))
    return tuple(out)


def _eos_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


# -- HF tokenizer.json --------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _flatten(component: Any) -> list[dict[str, Any]]:
    if not isinstance(component, dict):
        return []
    if component.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for key in ("decoders", "pretokenizers", "normalizers"):
            for c in component.get(key) or []:
                out.extend(_flatten(c))
        return out
    return [component]


def _transformers_prepend_scheme(cfg: dict[str, Any]) -> str | None:
    """Where transformers 5's `LlamaTokenizer` (the class LLaMA 1/2 HF checkpoints name) puts the
    "▁" prefix: its Metaspace pre-tokenizer's prepend scheme, "first" unless `legacy` ("always"),
    "never" when `add_prefix_space` is false. None for any other class, or no tokenizer_config.json
    (the Meta layout), where the tokenizer file's own rules apply."""
    if str(cfg.get("tokenizer_class") or "").removesuffix("Fast") != "LlamaTokenizer":
        return None
    add_prefix_space = cfg.get("add_prefix_space")
    if add_prefix_space is not None and not add_prefix_space:
        return "never"
    return "always" if cfg.get("legacy", False) else "first"


def _as_transformers_loads(spec: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Edit a parsed tokenizer.json (in place) into the pipeline transformers 5 builds from it.

    `AutoTokenizer` keeps the file's post-processor (so add_bos_token / add_eos_token in
    tokenizer_config.json do not change a tokenizer.json's rules: transformers drops them when
    there is one). Its `LlamaTokenizer` class, named by LLaMA 1/2 checkpoints, replaces the file's
    normalizer and pre-tokenizer by a Metaspace pre-tokenizer ("first" prepend scheme unless
    `legacy`, none when `add_prefix_space` is false), which encodes text after special tokens
    differently from the file's Prepend normalizer."""
    scheme = _transformers_prepend_scheme(cfg)
    if scheme is None:
        return
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": False}


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: Path, info: dict[str, Any], config_path: Path | None = None,
                 template_path: Path | None = None) -> None:
        import tokenizers

        cfg = _read_config(config_path)
        spec = json.loads(path.read_text(encoding="utf-8"))
        _as_transformers_loads(spec, cfg)
        self._json = json.dumps(spec)
        self._tok = tokenizers.Tokenizer.from_str(self._json)
        self._tok.encode_special_tokens = True  # special-token text is plain text by default
        self._tok_special: Any = None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self._added = {int(i): t.content for i, t in added.items()}
        self._special = {int(i) for i, t in added.items() if t.special}
        decoders = _flatten(spec.get("decoder"))
        types = [d.get("type") for d in decoders]
        if "ByteLevel" in types:
            self._mode = "bytelevel"
        elif "ByteFallback" in types or "Metaspace" in types or any(d.get("type") == "Replace" for d in decoders):
            self._mode = "sentencepiece"
        else:
            self._mode = "plain"
        self.strip_leading_space = any(d.get("type") == "Strip" and int(d.get("start", 0)) > 0 for d in decoders)
        # Metaspace (Mistral, newer Llama tokenizer.json) drops the dummy prefix per token, like SentencePiece.
        self._metaspace = any(d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never" for d in decoders)
        self.strip_leading_space = self.strip_leading_space or self._metaspace

        def token_id(key: str, default: str | None) -> int | None:
            text = _token_text(cfg[key]) if key in cfg else default
            return self._tok.token_to_id(text) if text is not None else None

        self.bos_id = info["bos_id"] if "bos_id" in info else token_id("bos_token", "<s>")
        # The stop set: the manifest's ids (config.json and generation_config.json) and the eos_token.
        self.eos_ids = _union(_eos_tuple(info.get("eos_ids")), [token_id("eos_token", None if "eos_ids" in info else "</s>")])
        defaults = {"bos_token": self._tok.id_to_token(self.bos_id) if self.bos_id is not None else None,
                    "eos_token": self._tok.id_to_token(self.eos_ids[0]) if self.eos_ids else None}
        self.special_token_strings = _special_strings(cfg, defaults)
        self.chat_template = _chat_template(cfg, template_path)
        self._bytes_cache: dict[int, bytes] = {}

    def encode(self, text: str, add_bos: bool = True, allow_special: bool = False) -> list[int]:
        tok = self._tok
        if allow_special:
            if self._tok_special is None:
                import tokenizers

                self._tok_special = tokenizers.Tokenizer.from_str(self._json)
            tok = self._tok_special
        body = tok.encode(text, add_special_tokens=False)
        if not add_bos:
            return list(body.ids)
        ids = list(tok.post_process(body, add_special_tokens=True).ids)
        if self.bos_id is not None and body.ids[:1] == [self.bos_id] and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]  # the text starts with BOS already (a chat template wrote it)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def consumes_leading_space(self, token_id: int) -> bool:
        if not self._metaspace:
            return True
        piece = self._tok.id_to_token(token_id) or ""
        return not (piece.startswith("<0x") and piece.endswith(">")) and piece != "<unk>"

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def id_to_bytes(self, token_id: int) -> bytes:
        b = self._bytes_cache.get(token_id)
        if b is not None:
            return b
        self._check_id(token_id)
        if token_id in self._added:
            b = self._added[token_id].encode("utf-8")
        else:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                raise TokenizerError(f"token id {token_id} has no token in tokenizer.json")
            if self._mode == "bytelevel":
                b = bytes(_BYTE_DECODER[c] for c in piece) if all(c in _BYTE_DECODER for c in piece) \
                    else piece.encode("utf-8")
            elif self._mode == "sentencepiece":
                m = _SP_BYTE.fullmatch(piece)
                b = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
            else:
                b = piece.encode("utf-8")
        self._bytes_cache[token_id] = b
        return b


# -- SentencePiece ------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path, info: dict[str, Any], config_path: Path | None = None,
                 template_path: Path | None = None) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise TokenizerError(f"{path.name}: cannot load SentencePiece model ({e})") from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = info["bos_id"] if "bos_id" in info else (sp.bos_id() if sp.bos_id() >= 0 else None)
        cfg = _read_config(config_path)
        eos_text = _token_text(cfg.get("eos_token"))
        eos_piece = sp.piece_to_id(eos_text) if eos_text is not None else -1
        self.eos_ids = _union(_eos_tuple(info["eos_ids"]) if "eos_ids" in info else
                              ((sp.eos_id(),) if sp.eos_id() >= 0 else ()),
                              [eos_piece if eos_text is not None and sp.id_to_piece(eos_piece) == eos_text else None])
        # LlamaTokenizer's defaults (BOS, no EOS) unless tokenizer_config.json says otherwise.
        self._add_bos_token = bool(cfg.get("add_bos_token", True))
        self._add_eos_token = bool(cfg.get("add_eos_token", False))
        self.special_token_strings = _special_strings(cfg, {
            "bos_token": sp.id_to_piece(self.bos_id) if self.bos_id is not None else None,
            "eos_token": sp.id_to_piece(self.eos_ids[0]) if self.eos_ids else None,
            "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None})
        self.chat_template = _chat_template(cfg, template_path)
        self._control = {i for i in range(self.vocab_size) if sp.is_control(i)}
        probe = sp.encode("a", out_type=str)
        self.strip_leading_space = bool(probe) and probe[0].startswith("\u2581")
        pieces = sorted((sp.id_to_piece(i) for i in self._control), key=len, reverse=True)
        self._control_re = re.compile("|".join(re.escape(p) for p in pieces if p)) if pieces else None
        self._prepend_scheme = _transformers_prepend_scheme(cfg)
        if self._prepend_scheme is not None:
            # transformers' Metaspace decides where the "▁" prefix goes, so this copy never adds
            # SentencePiece's own dummy prefix (decoding keeps using the original).
            self._sp_no_prefix = spm.SentencePieceProcessor(model_file=str(path))
            self._sp_no_prefix.override_normalizer_spec(add_dummy_prefix=False)

    def _encode_text(self, text: str, first: bool) -> list[int]:
        """One run of text between special tokens; `first`: it starts the prompt."""
        scheme = self._prepend_scheme
        if scheme is None:  # the Meta layout: SentencePiece's own rule, a dummy prefix on every run
            return list(self._sp.encode(text))
        if (scheme == "always" or (scheme == "first" and first)) and not text.startswith((" ", "\u2581")):
            text = " " + text
        return list(self._sp_no_prefix.encode(text))

    def encode(self, text: str, add_bos: bool = True, allow_special: bool = False) -> list[int]:
        if not allow_special or self._control_re is None:
            ids = self._encode_text(text, first=True) if text else []
            return self._with_specials(ids, add_bos, self._add_bos_token, self._add_eos_token)
        ids = []
        pos = 0
        for m in self._control_re.finditer(text):
            if m.start() > pos:
                ids.extend(self._encode_text(text[pos:m.start()], first=pos == 0))
            ids.append(self._sp.piece_to_id(m.group(0)))
            pos = m.end()
        if pos < len(text):
            ids.extend(self._encode_text(text[pos:], first=pos == 0))
        return self._with_specials(ids, add_bos, self._add_bos_token, self._add_eos_token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if skip_special_tokens or not any(i in self._control for i in ids):
            return self._sp.decode([i for i in ids if i not in self._control])
        data = b"".join(self.id_to_bytes(i) for i in ids)
        text = data.decode("utf-8", errors="replace")
        first = next((i for i in ids if i not in self._control), None)
        if self.strip_leading_space and first is not None:
            lead = b"".join(self.id_to_bytes(i) for i in ids[: ids.index(first)]).decode("utf-8", "replace")
            if text[len(lead):].startswith(" "):
                text = lead + text[len(lead) + 1:]
        return text

    def consumes_leading_space(self, token_id: int) -> bool:
        # SentencePiece consumes the dummy-prefix "▁" of the first normal piece only; a <0x20>
        # byte piece or <unk> (" ⁇ ") keeps its space.
        return not (self._sp.is_byte(token_id) or self._sp.is_unknown(token_id))

    def is_special(self, token_id: int) -> bool:
        return token_id in self._control

    def id_to_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        sp = self._sp
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):
            m = _SP_BYTE.fullmatch(piece)
            assert m is not None, piece
            return bytes([int(m.group(1), 16)])
        if sp.is_unknown(token_id):
            return " \u2047 ".encode("utf-8")  # what sp.decode renders for <unk>
        return piece.replace("\u2581", " ").encode("utf-8")


# -- tiktoken (Llama 3) -------------------------------------------------------------------------

# Meta's workaround for tiktoken's slow path on very long runs (llama-models tokenizer.py).
_TIKTOKEN_MAX_ENCODE_CHARS = 400_000
_MAX_NO_WHITESPACES_CHARS = 25_000


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file ("<base64 token> <rank>" per line).

    Same format as `tiktoken.load.load_tiktoken_bpe`, which however also copies every local file
    into a cache keyed by its *path* (so a changed file at the same path can be served stale)."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except Exception:
                raise TokenizerError(f"{path.name}: line {lineno} is not '<base64> <rank>'") from None
    return ranks


def _split_long_runs(s: str, max_len: int) -> Iterator[str]:
    """Split `s` so that no run of only-whitespace or only-non-whitespace exceeds `max_len`."""
    if len(s) <= max_len:
        yield s
        return
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len = 1
            run_is_space = is_space
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start = i
                run_len = 1
    yield s[start:]


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path, info: dict[str, Any], config_path: Path | None = None,
                 template_path: Path | None = None) -> None:
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        specials = info.get("special_tokens")
        if specials is None:
            from_id = len(ranks)
            names = [
                "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
            ]
            names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
            specials = {t: from_id + i for i, t in enumerate(names)}
        self._specials = {str(k): int(v) for k, v in specials.items()}
        self._special_ids = set(self._specials.values())
        self._num_base = len(ranks)
        pattern = info.get("pattern")
        if not pattern:
            raise TokenizerError(f"{path.name}: tiktoken tokenizer info has no 'pattern'")
        self._enc = tiktoken.Encoding(
            name=f"llama-forge:{path.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self._specials
        )
        self.vocab_size = self._enc.n_vocab
        self.bos_id = info["bos_id"] if "bos_id" in info else self._specials.get("<|begin_of_text|>")
        cfg = _read_config(config_path)
        eos_text = _token_text(cfg.get("eos_token"))
        self.eos_ids = _union(_eos_tuple(info["eos_ids"]) if "eos_ids" in info else
                              [self._specials.get("<|end_of_text|>")],
                              [self._specials.get(eos_text) if eos_text is not None else None])
        # Meta's Llama 3 tokenizer encodes with bos=True, eos=False unless tokenizer_config.json says otherwise.
        self._add_bos_token = bool(cfg.get("add_bos_token", True))
        self._add_eos_token = bool(cfg.get("add_eos_token", False))
        special_names = {i: t for t, i in self._specials.items()}
        self.special_token_strings = _special_strings(cfg, {
            "bos_token": special_names.get(self.bos_id) if self.bos_id is not None else None,
            "eos_token": special_names.get(self.eos_ids[0]) if self.eos_ids else None})
        self.chat_template = _chat_template(cfg, template_path)

    def encode(self, text: str, add_bos: bool = True, allow_special: bool = False) -> list[int]:
        allowed: Any = "all" if allow_special else set()
        ids: list[int] = []
        for i in range(0, max(len(text), 1), _TIKTOKEN_MAX_ENCODE_CHARS):
            for part in _split_long_runs(text[i:i + _TIKTOKEN_MAX_ENCODE_CHARS], _MAX_NO_WHITESPACES_CHARS):
                ids.extend(self._enc.encode(part, allowed_special=allowed, disallowed_special=()))
        return self._with_specials(ids, add_bos, self._add_bos_token, self._add_eos_token)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._enc.decode(ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def id_to_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:
            raise TokenizerError(f"token id {token_id} is not in the tiktoken vocabulary") from None


# -- entry point ----------------------------------------------------------------------------------


def load_tokenizer(engine_dir: str | Path, info: dict[str, Any]) -> Tokenizer:
    """Load the tokenizer described by the manifest entry `info` from `engine_dir`."""
    d = Path(engine_dir)
    kind = info.get("kind")
    file = info.get("file") or ("tokenizer.json" if kind == "hf" else "tokenizer.model")
    path = d / file
    if not path.is_file():
        raise TokenizerError(f"{file}: tokenizer file not found in {d}")
    cfg = info.get("config_file")
    template = info.get("chat_template_file")
    config_path = d / cfg if cfg else None
    template_path = d / template if template else None
    if kind == "hf":
        return HFTokenizer(path, info, config_path, template_path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, info, config_path, template_path)
    if kind == "tiktoken":
        return TiktokenTokenizer(path, info, config_path, template_path)
    raise TokenizerError(f"{file}: unknown tokenizer kind {kind!r} (expected hf, sentencepiece or tiktoken)")
