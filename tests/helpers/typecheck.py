"""The tree mypy reads the package through (a helper module, not a test file).

mypy cannot follow setuptools' editable import hook, which maps `llamaforge.<stage>` onto the
top-level stage folders (pyproject.toml [tool.setuptools.package-dir]). `link_tree(dest)` lays the
same mapping out as symbolic links, `dest/llamaforge/<stage> -> <stage>/`, and puts a copy of
`tensorrt-stubs` with its syntax errors repaired in `dest/stubs` (trt_stubs.py). Run mypy with
`dest` as the working directory and MYPYPATH=stubs.

    python tests/helpers/typecheck.py DEST     (make lint)
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

from trt_stubs import patched_stubs

ROOT = Path(__file__).resolve().parents[2]


def link_tree(dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package = dest / "llamaforge"
    package.mkdir(parents=True)
    for entry in (ROOT / mapping["llamaforge"]).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "llamaforge":
            (package / name.split(".", 1)[1]).symlink_to(ROOT / folder)
    patched_stubs(dest / "stubs")
    return dest


if __name__ == "__main__":
    print(link_tree(Path(sys.argv[1]).resolve()))
