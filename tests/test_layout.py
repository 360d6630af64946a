"""The package layout: one import namespace, `llamaforge.*`, over the top-level stage folders."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_namespace_outside_the_repository(tmp_path: Path) -> None:
    """From a folder outside the checkout, the stages import as `llamaforge.<stage>` and the generic
    top-level names (`runtime`, `export`, ...) are not importable at all."""
    code = """
import importlib, json
found = {}
for name in ("llamaforge.runtime", "llamaforge.runtime.core.engine_core", "llamaforge.export.checkpoint",
             "llamaforge.graphs.pipeline", "llamaforge.plugins.attention.schema", "llamaforge.triton_repo.repository",
             "runtime", "export", "graphs", "plugins", "triton_repo"):
    try:
        importlib.import_module(name)
        found[name] = True
    except ModuleNotFoundError:
        found[name] = False
print(json.dumps(found))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in found.items() if k.startswith("llamaforge")} == {
        k: True for k in found if k.startswith("llamaforge")}
    assert {k: v for k, v in found.items() if not k.startswith("llamaforge")} == {
        k: False for k in found if not k.startswith("llamaforge")}


# bench/.work: the benchmarks' work folder (peers' virtualenvs and sources, engines), ignored by git.
WORK_FOLDER = ".work"


def test_every_package_folder_is_declared() -> None:
    """pyproject.toml lists the packages explicitly (package-dir maps them onto the stage folders):
    a new subpackage that is not listed would be missing from a normal install."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    roots = tool["package-dir"]
    on_disk = set()
    for package, folder in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *rel.parts]))
    assert on_disk == declared


def test_no_sys_path_edits_in_sources() -> None:
    """Nothing makes the package importable by editing sys.path: it is installed (make venv)."""
    offenders = []
    for folder in ("llamaforge", "export", "graphs", "plugins", "runtime", "triton_repo", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if WORK_FOLDER in path.relative_to(ROOT).parts:  # peers' sources the benchmarks download
                continue
            for line in path.read_text().splitlines():
                if ("sys.path." + "insert") in line or ("sys.path." + "append") in line:
                    offenders.append(str(path.relative_to(ROOT)))
    # The Triton stand-in tests put a model's folder on the path of the process that plays Triton's
    # Python backend, as that backend does.
    assert offenders == ["tests/triton_repo/test_tp_repo.py", "tests/triton_repo/test_triton_repo.py"], offenders


def test_normal_install_carries_the_same_layout(tmp_path: Path) -> None:
    """A wheel (a normal, non-editable install) holds the stage folders under `llamaforge/`, with the
    package data, and no generic top-level package."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if name.startswith(("checkpoints/", "docs/", "tests/", "bench/")):
            continue
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"llamaforge"}
    for expected in ("llamaforge/cli.py", "llamaforge/build/builder.py", "llamaforge/export/checkpoint.py",
                     "llamaforge/graphs/trt_supported_ops.json", "llamaforge/plugins/attention/schema.py",
                     "llamaforge/runtime/core/engine_core.py", "llamaforge/runtime/serving/server.py",
                     "llamaforge/triton_repo/repository.py", "llamaforge/triton_repo/models/llama.py"):
        assert expected in names, expected


def test_no_source_file_is_ignored_by_git() -> None:
    """A module that .gitignore hides works here and is missing from every clean clone."""
    sources = [str(p.relative_to(ROOT)) for folder in ("llamaforge", "export", "graphs", "plugins", "runtime", "tests", "bench")
               for p in (ROOT / folder).rglob("*.py")
               if "__pycache__" not in p.parts and WORK_FOLDER not in p.relative_to(ROOT).parts]
    sources += [str(p.relative_to(ROOT)) for p in [*(ROOT / "triton_repo").glob("*.py"), *(ROOT / "triton_repo" / "models").glob("*.py")]]
    r = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(sources), capture_output=True, text=True)
    assert r.stdout.split() == [], r.stdout
