"""llamaforge.runtime.core.detokenizer: streamed text == decode(ids) for every tokenizer kind and chunking, UTF-8
characters split across tokens held back, leading-space handling, stop words."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tiny_models import (
    SAMPLE_TEXTS,
    tiny_tiktoken_ranks,
    train_tiny_sentencepiece,
    train_tiny_tokenizer,
    write_tiktoken_ranks,
)

from llamaforge.export.tokenizer_files import LLAMA3_PAT_STR, llama3_special_tokens
from llamaforge.runtime.core.detokenizer import IncrementalDetokenizer, decode_all
from llamaforge.runtime.core.tokenizer import load_tokenizer

KINDS = ["bpe", "sp", "hf_sp", "tiktoken"]
TEXTS = SAMPLE_TEXTS + [
    " leading space, then 日本語 and 🙂🙃 emoji",
    "ÿ€𝄞 — mixed widths: a\u00e9\u4e2d\U0001f600z",
]


def _hf_sentencepiece_json(sp_model: Path) -> str:
    """A Llama-2-style tokenizer.json (BPE with byte fallback, "▁" normalizer, decoder ending in
    Strip(" ", 1, 0)) converted from the tiny SentencePiece model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_byte(pid) or sp.is_unknown(pid):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return tok.to_str()


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("detok")
    out = {}
    d = root / "bpe"
    d.mkdir()
    train_tiny_tokenizer().save(str(d / "tokenizer.json"))
    out["bpe"] = load_tokenizer(d, {"kind": "hf", "file": "tokenizer.json", "bos_id": 1, "eos_ids": [2]})
    d = root / "sp"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(train_tiny_sentencepiece())
    out["sp"] = load_tokenizer(d, {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1, "eos_ids": [2]})
    d2 = root / "hf_sp"
    d2.mkdir()
    (d2 / "tokenizer.json").write_text(_hf_sentencepiece_json(d / "tokenizer.model"), encoding="utf-8")
    out["hf_sp"] = load_tokenizer(d2, {"kind": "hf", "file": "tokenizer.json", "bos_id": 1, "eos_ids": [2]})
    d = root / "tiktoken"
    d.mkdir()
    ranks = tiny_tiktoken_ranks()
    write_tiktoken_ranks(d / "tokenizer.model", ranks)
    sp_tokens = llama3_special_tokens(len(ranks))
    out["tiktoken"] = load_tokenizer(d, {
        "kind": "tiktoken", "file": "tokenizer.model", "pattern": LLAMA3_PAT_STR, "num_base_tokens": len(ranks),
        "special_tokens": sp_tokens, "bos_id": sp_tokens["<|begin_of_text|>"],
        "eos_ids": [sp_tokens["<|end_of_text|>"], sp_tokens["<|eot_id|>"]]})
    assert out["sp"].strip_leading_space and out["hf_sp"].strip_leading_space
    assert not out["bpe"].strip_leading_space and not out["tiktoken"].strip_leading_space
    return out


def _chunkings(ids, rng, n_random=3):
    yield [[i] for i in ids]
    yield [list(ids)]
    for _ in range(n_random):
        chunks, i = [], 0
        while i < len(ids):
            n = rng.randint(0, 4)  # empty chunks too
            chunks.append(ids[i:i + n])
            i += n
        yield chunks


def _stream(tok, chunks, stop_words=()):
    d = IncrementalDetokenizer(tok, stop_words)
    pieces = [d.add(c) for c in chunks]
    pieces.append(d.finish())
    assert d.text == "".join(pieces)
    return pieces, d


def _raw(tok, ids) -> bytes:
    return b"".join(tok.id_to_bytes(i) for i in ids if not tok.is_special(i))


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- invariant: stream == decode --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stream_equals_decode(toks, kind):
    tok = toks[kind]
    rng = random.Random(0)
    for text in TEXTS:
        body = tok.encode(text, add_bos=False)
        assert tok.decode(body) == text
        # BOS / EOS in the stream contribute nothing.
        for ids in (body, [tok.bos_id, *body, tok.eos_ids[0]]):
            want = tok.decode(ids)
            for chunks in _chunkings(ids, rng):
                pieces, d = _stream(tok, chunks)
                assert "".join(pieces) == want, (kind, text, chunks)
                assert all("\ufffd" not in p for p in pieces), (kind, text, pieces)
                assert not d.stopped and d.stop_word is None
            assert decode_all(tok, ids) == (want, False)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_of_generated_suffix_equals_decode(toks, kind):
    """Generated ids start mid-text (after a prompt): consistent with decode(generated ids), incl. the
    SentencePiece leading-space drop and slices that start or end inside a multi-byte character."""
    tok = toks[kind]
    rng = random.Random(1)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        for _ in range(6):
            a = rng.randrange(len(ids))
            b = rng.randrange(a, len(ids)) + 1
            gen = ids[a:b]
            raw = _raw(tok, gen)
            chunks = next(c for k, c in enumerate(_chunkings(gen, rng)) if k == 2)
            pieces, _ = _stream(tok, chunks)
            got = "".join(pieces)
            if _valid_utf8(raw) or kind in ("bpe", "tiktoken"):
                assert got == tok.decode(gen), (kind, text, gen)
            else:  # SentencePiece / HF ByteFallback render invalid bytes with their own U+FFFD count
                if tok.strip_leading_space and raw[:1] == b" ":
                    raw = raw[1:]
                assert got == raw.decode("utf-8", "replace")
            if _valid_utf8(raw):
                assert "\ufffd" not in got


@pytest.mark.parametrize("kind", ["bpe", "tiktoken"])
def test_random_ids_equal_decode(toks, kind):
    """Arbitrary ids (invalid UTF-8 anywhere, specials anywhere): byte-level decoders use the same
    "replace" rendering as the stream."""
    tok = toks[kind]
    rng = random.Random(2)
    for _ in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 25))]
        if rng.random() < 0.5:  # many single-byte tokens: lead / continuation / invalid bytes
            raw = bytes(rng.choice([rng.randrange(0x80, 0xC0), rng.randrange(0xC0, 0x100), 0x61])
                        for _ in range(len(ids)))
            ids = [b if rng.random() < 0.7 else i for i, b in zip(ids, _byte_ids(tok, kind, raw))]
        want = tok.decode(ids)
        for chunks in _chunkings(ids, rng, n_random=1):
            pieces, _ = _stream(tok, chunks)
            assert "".join(pieces) == want, (ids, chunks)
        assert decode_all(tok, ids)[0] == want


@pytest.mark.parametrize("kind", ["sp", "hf_sp"])
def test_random_valid_ids_equal_decode(toks, kind):
    tok = toks[kind]
    rng = random.Random(3)
    done = 0
    while done < 60:
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        raw = _raw(tok, ids)
        if not _valid_utf8(raw) or (kind == "sp" and any(tok._sp.is_unknown(i) for i in ids)):
            continue
        done += 1
        want = tok.decode(ids)
        for chunks in _chunkings(ids, rng, n_random=1):
            assert "".join(_stream(tok, chunks)[0]) == want, (ids, chunks)


# -- UTF-8 held back ----------------------------------------------------------------------------


def _byte_ids(tok, kind, data: bytes) -> list[int]:
    if kind == "tiktoken":
        return list(data)  # ranks 0..255 are the single bytes
    if kind == "sp":
        return [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in data]
    if kind == "hf_sp":
        return [tok._tok.token_to_id(f"<0x{b:02X}>") for b in data]
    from llamaforge.runtime.core.tokenizer import _bytes_to_unicode

    table = _bytes_to_unicode()
    return [tok._tok.token_to_id(table[b]) for b in data]


@pytest.mark.parametrize("kind", KINDS)
def test_split_character_held_back(toks, kind):
    tok = toks[kind]
    ids = _byte_ids(tok, kind, "a日🙂".encode())  # 1 + 3 + 4 bytes, one token each
    assert all(tok.id_to_bytes(i) == bytes([b]) for i, b in zip(ids, "a日🙂".encode()))
    d = IncrementalDetokenizer(tok)
    got = [d.add([i]) for i in ids]
    assert got == ["a", "", "", "日", "", "", "", "🙂"]
    assert d.finish() == "" and d.text == "a日🙂" == tok.decode(ids)
    # An incomplete tail at the end: rendered like bytes.decode("utf-8", "replace").
    for tail in (b"\xe6", b"\xe6\x97", b"\xf0\x9f\x99"):
        d = IncrementalDetokenizer(tok)
        assert d.add(_byte_ids(tok, kind, b"x" + tail)) == "x"
        assert d.finish() == tail.decode("utf-8", "replace") == "\ufffd"
    # A byte that can never become valid is replaced at once, not held back.
    d = IncrementalDetokenizer(tok)
    assert d.add(_byte_ids(tok, kind, b"\xe6a")) == "\ufffda"
    assert d.add(_byte_ids(tok, kind, b"\xff")) == "\ufffd"
    assert d.finish() == ""


# -- leading space --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sp", "hf_sp"])
def test_leading_space(toks, kind):
    tok = toks[kind]
    P = tok._sp.piece_to_id if kind == "sp" else tok._tok.token_to_id
    cases = [
        [P("\u2581a"), P("\u2581a")],
        [tok.bos_id, P("\u2581a")],  # a special token first: the space of the first text goes
        [P("\u2581"), P("\u2581a")],  # only one space, only of the first piece
        [P("\u2581"), P("\u2581")],
        [P("a"), P("\u2581a")],
        [P("<0x20>"), P("a")],  # SentencePiece keeps a byte-piece space; HF Strip drops it
        [P("<0xE6>"), P("<0x97>"), P("<0xA5>"), P("\u2581a")],
        [0, P("\u2581a")],  # <unk>
    ]
    for ids in cases:
        want = tok.decode(ids)
        for chunks in ([[i] for i in ids], [ids]):
            assert "".join(_stream(tok, chunks)[0]) == want, (kind, ids)
    d = IncrementalDetokenizer(tok)
    assert d.add([P("\u2581a")]) == "a" and d.add([P("\u2581a")]) == " a"
    assert _stream(tok, [[P("<0x20>"), P("a")]])[0][0] == (" a" if kind == "sp" else "a")


def test_no_strip_for_byte_level(toks):
    for kind in ("bpe", "tiktoken"):
        tok = toks[kind]
        ids = tok.encode(" hello", add_bos=False)
        assert decode_all(tok, ids)[0] == " hello" == tok.decode(ids)


# -- stop words -------------------------------------------------------------------------------------


def _first_stop(text: str, words) -> tuple[str, str | None]:
    """Reference: cut before the stop word that is completed first (ties: the longer one)."""
    for end in range(1, len(text) + 1):
        hits = [w for w in words if w and text[:end].endswith(w)]
        if hits:
            w = max(hits, key=len)
            return text[:end - len(w)], w
    return text, None


def _check_stop_stream(tok, ids, words, rng):
    full = tok.decode(ids)
    want, word = _first_stop(full, words)
    for chunks in _chunkings(ids, rng):
        d = IncrementalDetokenizer(tok, words)
        pieces = []
        for c in chunks:
            pieces.append(d.add(c))
            # Never emit text that later turns out to be (part of) the stop word.
            assert d.text == "".join(pieces) and want.startswith(d.text), (words, chunks, d.text)
        if d.stopped:
            assert d.add(ids[:3]) == ""  # nothing after the stop word
        pieces.append(d.finish())
        assert "".join(pieces) == want == d.text, (words, chunks)
        assert d.stopped == (word is not None) and d.stop_word == word
    assert decode_all(tok, ids, words) == (want, word is not None)
    return want, word


@pytest.mark.parametrize("kind", KINDS)
def test_stop_word_inside_token(toks, kind):
    tok = toks[kind]
    text = "Hello world! The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text, add_bos=False)
    pieces = [tok.id_to_bytes(i).decode() for i in ids]
    # A stop word strictly inside one multi-character token (and nowhere before it).
    shift = 1 if tok.strip_leading_space else 0
    for k in range(1, len(ids)):
        start = len("".join(pieces[:k])) - shift
        word = pieces[k][1:-1]
        if len(word) >= 2 and text.find(word) == start + 1:
            break
    else:
        raise AssertionError("no multi-character token to cut inside")
    want, got_word = _check_stop_stream(tok, ids, (word,), random.Random(4))
    assert got_word == word and want == text[:text.find(word)]
    d = IncrementalDetokenizer(tok, (word,))
    for i in ids[:k]:
        d.add([i])
    assert not d.stopped
    d.add([ids[k]])
    assert d.stopped and d.text == want and word not in d.text


@pytest.mark.parametrize("kind", KINDS)
def test_stop_word_spanning_tokens(toks, kind):
    tok = toks[kind]
    text = "naïve café — 日本語のテキスト 🙂 Ünïcödé and more"
    ids = tok.encode(text, add_bos=False)
    rng = random.Random(5)
    # Byte offsets of the token boundaries in the decoded text.
    shift = 1 if tok.strip_leading_space else 0
    bounds, n = set(), -shift
    for i in ids:
        n += len(tok.id_to_bytes(i))
        bounds.add(n)
    for word in ("é — 日", "語のテ", "🙂 Ü", "ïcödé and", "e caf"):
        if word in text:
            a = len(text[:text.find(word)].encode())
            assert any(a < b < a + len(word.encode()) for b in bounds), (kind, word)  # really spans
        want, w = _check_stop_stream(tok, ids, (word,), rng)
        if word in text:
            assert w == word and want == text[:text.find(word)] and word not in want
        else:
            assert w is None and want == text
    # Several stop words: the first one completed wins, whatever the chunking.
    for words in (("café —", "é"), ("テキスト", "日本語の", "本"), ("b", "more"), ("caf", "naïve café")):
        _check_stop_stream(tok, ids, words, rng)


@pytest.mark.parametrize("kind", KINDS)
def test_stop_word_never_completes(toks, kind):
    tok = toks[kind]
    text = "the lazy dog. the lazy dog"
    ids = tok.encode(text, add_bos=False)
    d = IncrementalDetokenizer(tok, ("dog!", "lazy cat"))
    pieces = [d.add([i]) for i in ids]
    assert not d.stopped
    assert not d.text.endswith("dog")  # held back: could still become "dog!"
    tail = d.finish()
    assert tail.endswith("dog") and "".join(pieces) + tail == text == d.text
    assert d.stop_word is None and not d.stopped
    _check_stop_stream(tok, ids, ("dog!", "lazy cat", "the lazy dog. thE"), random.Random(6))
    # A stop word at the very start, and one equal to the whole text.
    assert decode_all(tok, ids, ("the",)) == ("", True)
    assert decode_all(tok, ids, (text,)) == ("", True)
    assert decode_all(tok, ids, (text + "x",)) == (text, False)


@pytest.mark.parametrize("kind", KINDS)
def test_random_stop_words(toks, kind):
    tok = toks[kind]
    rng = random.Random(7)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        full = tok.decode(ids)
        for _ in range(4):
            words = []
            for _ in range(rng.randint(1, 3)):
                a = rng.randrange(len(full))
                words.append(full[a:a + rng.randint(1, 6)] + ("" if rng.random() < 0.7 else "\x00"))
            _check_stop_stream(tok, ids, tuple(words), rng)


# -- API --------------------------------------------------------------------------------------------


def test_api_edges(toks):
    tok = toks["sp"]
    with pytest.raises(TypeError):
        IncrementalDetokenizer(tok, "stop")
    with pytest.raises(TypeError):
        IncrementalDetokenizer(tok, (b"stop",))
    d = IncrementalDetokenizer(tok, ("", "zz"))  # empty stop words are ignored
    ids = tok.encode("abc", add_bos=False)
    assert d.add([]) == ""
    out = d.add(ids[0]) + d.add(ids[1:])
    assert out + d.finish() == "abc" and d.finish() == "" and d.finished
    with pytest.raises(RuntimeError):
        d.add(ids)
    assert decode_all(tok, []) == ("", False)



def test_hf_metaspace_decoder_stream_equals_decode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """tokenizer.json files with a Metaspace decoder (Mistral, newer Llama) drop the leading
    space in `decode`; the stream must too."""
    import json

    from tokenizers import SentencePieceBPETokenizer

    from llamaforge.runtime.core.tokenizer import load_tokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["Hello world, hello there. " * 20, "world of words " * 20], vocab_size=120,
                           special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    assert json.loads(sp.to_str())["decoder"]["type"] == "Metaspace"
    sp.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, {"kind": "hf", "file": "tokenizer.json", "bos_id": 1, "eos_ids": [2]})
    ids = tok.encode("Hello world hello", add_bos=False)
    assert tok.strip_leading_space
    streamed = IncrementalDetokenizer(tok)
    text = "".join(streamed.add([i]) for i in ids) + streamed.finish()
    assert text == tok.decode(ids) == "Hello world hello"
