"""Start ``medsam-rt serve`` as a child process on a free loopback port (tests, benchmarks, scripts).

The child is the real command (``python -m medsam_rt.tools.cli serve ...``): the same parser, model load and uvicorn.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from medsam_rt.errors import ServerStartError
from medsam_rt.tools.budget import current_rss


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``with ServerProcess(model_dir, "--token", "t") as srv: srv.url`` -- a running server, stopped on exit.

    Attributes:
        url: ``http://127.0.0.1:PORT``; pid: the child's process id; log: its stdout/stderr file.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *args: str,
        timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.args = list(args)
        self.timeout_s = timeout_s
        self.env = {**os.environ, **(env or {})}
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""

    def start(self) -> ServerProcess:
        for _ in range(3):  # a port taken between free_port() and the bind: try another
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            log_dir = self.log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
            self.log = log_dir / f"medsam-serve-{self.port}.log"
            cmd = [
                sys.executable,
                "-m",
                "medsam_rt.tools.cli",
                "serve",
                str(self.model_dir),
                "--port",
                str(self.port),
                *self.args,
            ]
            with open(self.log, "wb") as fh:
                self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
            if self._wait_ready():
                return self
            output = self.log.read_text(errors="replace")
            self.stop()
            if "address already in use" not in output.lower():
                raise ServerStartError(
                    f"medsam-rt serve did not start (exit {self.proc.returncode}):\n{output[-3000:]}"
                )
        raise ServerStartError("medsam-rt serve: no free port after 3 tries")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if json.load(r).get("status") == "ok":
                        return True
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
        return False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def rss_bytes(self) -> int:
        """The server process's resident memory now (Linux /proc); raises when the server is not running."""
        if self.proc is None or self.proc.poll() is not None:
            raise ServerStartError(f"the server (pid {self.pid}) has exited")
        return current_rss(self.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Reply:
    """An HTTP answer: ``status``, ``headers`` (lower-case names), ``data`` (bytes); :meth:`json` parses it."""

    def __init__(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.status, self.headers, self.data = status, headers, data

    def json(self):
        return json.loads(self.data)


class Client:
    """A small keep-alive HTTP client for the API (stdlib only; one per thread)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body=None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        headers = dict(headers or {})
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):
            try:
                self._conn.request(method, path, body=body, headers=headers)
                r = self._conn.getresponse()
                data = r.read()
                return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
            except (ConnectionError, OSError):
                self._conn.close()  # a dropped keep-alive connection: reconnect once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def upload(self, data: bytes, filename: str, **fields: object) -> Reply:
        """``POST /v1/images`` with ``data`` as the multipart field ``file`` and ``fields`` as form fields."""
        body, ctype = multipart({k: str(v) for k, v in fields.items() if v is not None}, ("file", filename, data))
        return self.request("POST", "/v1/images", body=body, headers={"Content-Type": ctype})

    def close(self) -> None:
        self._conn.close()


def multipart(fields: dict[str, str], file: tuple[str, str, bytes] | None) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = "medsamrt" + os.urandom(8).hex()
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file is not None:
        name, filename, data = file
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
