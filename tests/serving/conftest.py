"""A failing test's report carries the log tail of every `llamaforge serve` process it used through
a fixture (tests/helpers/server_process.py): the server's side of an HTTP 500 or a hang is in its
log, and a CI run is often the only place a failure shows."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from server_process import ServerProcess


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name, value in funcargs.items():
            if isinstance(value, ServerProcess):
                report.sections.append((f"server log ({name})", value.log_tail()))
    return report
