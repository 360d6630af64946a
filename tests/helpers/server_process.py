"""A real `llamaforge serve` process on free ports, for the tests of the CLI and the OpenAI front end
(a helper module, not a test file).

    with serve_process(engine_dir) as server:     # free gRPC, HTTP and metrics ports on 127.0.0.1
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        server.metric("llamaforge_kv_cache_free_fraction")

    with serve_process(engine_dir, "--tls-cert", cert, "--tls-key", key, "--host", "127.0.0.2",
                       env={"LLAMAFORGE_API_KEY": "k"}) as server:   # server.base_url: https://127.0.0.2:PORT/v1

The server's environment is this one without LLAMAFORGE_API_KEY, plus `env`. Its stdout and stderr
go to a log file (`server.log_path`; `server.output()`, `server.log_tail()`), not to a pipe: a pipe
nobody reads fills up and then blocks the server's next write (a traceback, a warning) mid-request.
A test that fails while the server is up gets the log's tail in its report (tests/serving/conftest.py
for the fixtures' servers; the `with` block itself prints it when an exception leaves it). The file is
removed when the server has stopped cleanly.

`http_call(url, body, key=..., context=...)` is a stdlib HTTP(S) call that returns (status, JSON
body, headers), errors included.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "serve_process", "http_call", "START_TIMEOUT_S"]

# How long the start line may take: loading the engine on a loaded CI machine (load 12-15 on 2 cores).
START_TIMEOUT_S = 300.0

# serve()'s start line: "... on grpc HOST:PORT, metrics http://HOST:PORT/metrics, openai SCHEME://HOST:PORT/v1"
_LINE = re.compile(r"on grpc (\S+?):(\d+), metrics http://\S+?:(\d+)/metrics, openai (https?)://\S+?:(\d+)/v1")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int
    http_port: int
    host: str = "127.0.0.1"  # as URLs write it ("[::1]" for IPv6)
    scheme: str = "http"  # of the HTTP port: https with --tls-cert (metrics stay http)
    start_line: str = ""
    log_path: Path | None = None  # the server's stdout + stderr

    def output(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        if self.log_path is None:
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 200) -> str:
        """The last `lines` lines of `output()`, headed by the log's path."""
        text = self.output().splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(text)} lines) ---\n" + "\n".join(text)

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode("utf-8")

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric (or the first sample of `name{...}`)."""
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", self.metrics(), re.MULTILINE)
        if m is None:
            raise KeyError(name)
        return float(m.group(1))


@contextmanager
def serve_process(engine_dir: Path, *args: str, env: Mapping[str, str] | None = None,
                  launcher: tuple[str, ...] = (), exit_status: int | None = 0) -> Iterator[ServerProcess]:
    """`llamaforge serve ENGINE --port 0 --http-port 0 --metrics-port 0 ARGS`; SIGTERM on exit, which
    must end it with status 0 (a test may have sent it and waited already). `launcher`: the command
    the server runs under (e.g. `mpiexec -n 2` for a tensor-parallel engine); `exit_status`: the
    status it must end with (None: any, for a test that kills part of it)."""
    root = Path(__file__).resolve().parents[2]
    environ = {k: v for k, v in os.environ.items() if k != "LLAMAFORGE_API_KEY"} | dict(env or {})
    fd, name = tempfile.mkstemp(prefix="llamaforge-serve-", suffix=".log")
    log_path = Path(name)
    with os.fdopen(fd, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [*launcher, sys.executable, "-c", "import sys; from llamaforge.cli import main; sys.exit(main())", "serve",
             str(engine_dir), "--port", "0", "--http-port", "0", "--metrics-port", "0", *args],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, text=True, env=environ)
    clean = False
    try:
        line = _start_line(proc, log_path)
        m = _LINE.search(line)
        assert m is not None
        server = ServerProcess(proc, int(m.group(2)), int(m.group(3)), int(m.group(5)), host=m.group(1),
                               scheme=m.group(4), start_line=line, log_path=log_path)
        try:
            yield server
        except BaseException as e:
            if not isinstance(e, GeneratorExit):  # GeneratorExit: closed unfinished, not a failure
                print(server.log_tail(), file=sys.stderr)  # pytest shows it under "Captured stderr"
            raise
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
        assert exit_status is None or status == exit_status, \
            f"the server exited with status {status}\n{server.log_tail()}"
        clean = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if clean:
            log_path.unlink(missing_ok=True)


def _start_line(proc: subprocess.Popen[str], log_path: Path) -> str:
    """serve()'s start line, read from the log as it grows; RuntimeError with the log if the server
    exits or does not print it within START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines(keepends=True):
            if line.endswith("\n") and _LINE.search(line):
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it started:\n{text}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {START_TIMEOUT_S:g} s:\n{text}")
        time.sleep(0.05)


def http_call(url: str, body: dict[str, Any] | None = None, key: str | None = None,
              context: ssl.SSLContext | None = None, authorization: str | None = None) -> tuple[int, Any, Any]:
    """(status, JSON body or None, headers) of a GET (no body) or POST."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if authorization is not None:
        headers["authorization"] = authorization
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None, r.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None, e.headers
