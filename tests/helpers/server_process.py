"""A real `llamaforge serve` process on free ports, for the tests of the CLI and the OpenAI front end
(a helper module, not a test file).

    with serve_process(engine_dir) as server:     # free gRPC, HTTP and metrics ports on 127.0.0.1
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        server.metric("llamaforge_kv_cache_free_fraction")
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerProcess", "serve_process"]

_LINE = re.compile(r"on grpc 127\.0\.0\.1:(\d+), metrics http://127\.0\.0\.1:(\d+)/metrics, "
                   r"openai http://127\.0\.0\.1:(\d+)/v1")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode("utf-8")

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric (or the first sample of `name{...}`)."""
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", self.metrics(), re.MULTILINE)
        if m is None:
            raise KeyError(name)
        return float(m.group(1))


@contextmanager
def serve_process(engine_dir: Path, *args: str) -> Iterator[ServerProcess]:
    """`llamaforge serve ENGINE --port 0 --http-port 0 --metrics-port 0 ARGS`; SIGTERM on exit, which
    must end it with status 0."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from llamaforge.cli import main; sys.exit(main())", "serve",
         str(engine_dir), "--port", "0", "--http-port", "0", "--metrics-port", "0", *args],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = _LINE.search(line)
        if m is None:
            raise RuntimeError(f"the server did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}")
        yield ServerProcess(proc, int(m.group(1)), int(m.group(2)), int(m.group(3)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
