"""runtime/serving/engine_client.py: mypy checks that the real `EngineCore` and the tests' `FakeCore`
both satisfy `EngineClient`, the seam the gRPC server and the Triton `llama` model are typed against,
and that the check means something: a FakeCore with a method missing, or with a method whose
signature differs, is reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fake_core
import pytest
from typecheck import link_tree

ROOT = Path(__file__).resolve().parents[2]

CONFORMS = """
from {module} import FakeCore
from llamaforge.runtime.core.engine_core import EngineCore
from llamaforge.runtime.serving.engine_client import EngineClient


def fake(core: FakeCore) -> EngineClient:
    return core


def real(core: EngineCore) -> EngineClient:
    return core
"""


@pytest.mark.slow
def test_engine_core_and_fake_core_satisfy_the_protocol(tmp_path_factory: pytest.TempPathFactory) -> None:
    tree = link_tree(tmp_path_factory.mktemp("typecheck"))
    source = Path(fake_core.__file__).read_text()
    broken = {
        "fake_ok": source,
        "fake_no_stats": source.replace("    def stats(self)", "    def statistics(self)"),
        "fake_bad_cancel": source.replace("def cancel(self, request_id: str)", "def cancel(self, request_id: int)"),
    }
    assert all(text != source for name, text in broken.items() if name != "fake_ok"), "the mutations must apply"
    for name, text in broken.items():
        (tree / f"{name}.py").write_text(text)
        (tree / f"uses_{name}.py").write_text(CONFORMS.format(module=name))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *(f"uses_{n}.py" for n in broken)],
        cwd=tree, capture_output=True, text=True, timeout=600, env={"MYPYPATH": "stubs", "PATH": "/usr/bin:/bin"})
    by_file: dict[str, str] = {}
    for line in result.stdout.splitlines():
        by_file[line.split(":", 1)[0]] = by_file.get(line.split(":", 1)[0], "") + line + "\n"
    assert "uses_fake_ok.py" not in by_file and "fake_ok.py" not in by_file, result.stdout
    assert not [f for f in by_file if f.startswith("llamaforge/")], result.stdout
    no_stats, bad_cancel = by_file.get("uses_fake_no_stats.py", ""), by_file.get("uses_fake_bad_cancel.py", "")
    assert '"FakeCore" is missing following "EngineClient" protocol member' in no_stats, result.stdout
    assert "note:     stats" in no_stats, result.stdout
    assert 'Following member(s) of "FakeCore" have conflicts' in bad_cancel and "cancel" in bad_cancel, result.stdout
    # Only the fake is broken: the real core's line (`real`, the last return) is never reported.
    assert ":12: error" not in no_stats + bad_cancel, result.stdout
