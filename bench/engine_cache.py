"""Bench engines built once under bench/.work/ and rebuilt when the build's sources change: a stamp
file in the engine directory holds a fingerprint of every source file the build reads (and of what
else the caller says went into it), so an engine built by older code is never timed as if it were
the tree's."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SOURCES = ("export", "graphs", "plugins", "llamaforge")
STAMP = ".bench-fingerprint"


def sources_fingerprint(extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for top in BUILD_SOURCES:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(ROOT)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def is_current(out: Path, fingerprint: str) -> bool:
    stamp = out / STAMP
    return (out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint


def ensure_engine(out: Path, extra: str, build: Callable[[], None]) -> Path:
    """`out`, built by `build()` unless the engine there was built from the tree's sources (and `extra`)."""
    fingerprint = sources_fingerprint(extra)
    if not is_current(out, fingerprint):
        build()
        (out / STAMP).write_text(fingerprint)
    return out
