"""A syntactically valid copy of the installed `tensorrt-stubs`, for mypy (a helper module, not a test file).

tensorrt-stubs 10.13.0.35.1 (every release on PyPI is generated the same way) has .pyi lines that
are not Python: parameters named `in` (a keyword) and a parameter without a default after ones
with defaults (`INetworkDefinition.add_scale_nd`). mypy stops at the first syntax error in a stub,
so `patched_stubs(dest)` writes a copy with exactly those two defects repaired (`in` -> `in_`; the
trailing parameter gets `= ...`) and checks that every file then parses. Pointing MYPYPATH at
`dest` makes mypy use the copy instead of site-packages; everything else is the stubs' own text
(one known loss: the stubs define a module attribute `bool` (TensorRT's BOOL DataType), which
shadows the builtin, so their `-> bool` annotations are Any).
"""

from __future__ import annotations

import ast
import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "tensorrt-stubs"
_KEYWORD_PARAM = re.compile(r"(?<=[(,])(\s*)in(\s*:)")


class StubsUnavailable(RuntimeError):
    pass


def _split_params(params: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return [*out, current] if current.strip() else out


def _default_after_default(line: str) -> str:
    """`def f(a: int = None, b: int) -> X:` -> `def f(a: int = None, b: int = ...) -> X:`."""
    head, sep, rest = line.partition("(")
    params, close, tail = rest.rpartition(")")
    fixed, seen_default = [], False
    for p in _split_params(params):
        if "=" in p:
            seen_default = True
        elif seen_default and ":" in p and not p.strip().startswith("*"):
            p = p + " = ..."
        fixed.append(p)
    return head + sep + ",".join(fixed) + close + tail


def _repair(text: str) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith("def "):
            line = _KEYWORD_PARAM.sub(r"\1in_\2", line)
            if "=" in line:
                line = _default_after_default(line)
            lines[i] = line
    return "".join(lines)


def patched_stubs(dest: Path) -> Path:
    """Write the repaired stubs under `dest` (tensorrt/, tensorrt_bindings/); returns `dest`."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise StubsUnavailable(f"{DISTRIBUTION} is not installed (make venv installs it with --no-deps)") from None
    stubs = [f for f in dist.files or [] if str(f).endswith(".pyi")]
    if not stubs:
        raise StubsUnavailable(f"{DISTRIBUTION} {dist.version} has no .pyi files")
    for f in stubs:
        text = _repair(Path(dist.locate_file(f)).read_text())
        try:
            ast.parse(text, filename=str(f))
        except SyntaxError as e:
            raise StubsUnavailable(f"{DISTRIBUTION} {dist.version}: {f} line {e.lineno} still does not parse: {e.msg}") from None
        target = dest / str(f)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The stubs' own defects (module attributes named `bool`, untyped defs, a missing
        # `tensorrt_libs`) are not ours to report; their types are still used.
        target.write_text("# mypy: ignore-errors\n" + text)
    return dest

