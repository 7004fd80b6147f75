"""A static file server that honours HTTP Range, and can misbehave on purpose.

    python tests/range_server.py ROOT --port 8123 [--drop-every 7] [--fail-every 11]
                                 [--delay-every 13 --delay 3.0]

Serves ROOT (directory listings included) with ``Range: bytes=a-b`` answered by 206 and exactly
those bytes. Faults hit every N-th ranged GET: ``--drop-every`` closes the connection without an
answer, ``--fail-every`` answers 503, ``--delay-every`` waits ``--delay`` seconds first (past a
client's timeout). Each fault is one line on stdout (``fault drop /path``), so a test can count
them. Tests start it with :func:`start` and stop it by its PID.
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once, not 40 ms apart
    faults: dict = {}
    counter = [0]
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _fault(self) -> str | None:
        with self.lock:
            self.counter[0] += 1
            n = self.counter[0]
        for kind in ("drop", "fail", "delay"):
            every = self.faults.get(kind)
            if every and n % every == 0:
                print(f"fault {kind} {self.path}", flush=True)
                return kind
        return None

    def do_GET(self) -> None:
        match = _RANGE.match(self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().do_GET()
        fault = self._fault()
        if fault == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if fault == "fail":
            self.send_error(503, "injected")
            return
        if fault == "delay":
            time.sleep(self.faults["delay_seconds"])
        size = path.stat().st_size
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def start(root: Path, *options: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start the server on ``root`` with ``options``; returns (process, base URL)."""
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    argv = [sys.executable, __file__, str(root), "--port", str(port), *options]
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    wait_listening(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--drop-every", type=int, default=0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--delay-every", type=int, default=0)
    parser.add_argument("--delay", type=float, default=3.0)
    args = parser.parse_args()
    Handler.faults = {"drop": args.drop_every, "fail": args.fail_every,
                      "delay": args.delay_every, "delay_seconds": args.delay}  # fmt: skip
    os.chdir(args.root)
    http.server.ThreadingHTTPServer.request_queue_size = 128  # a batch's requests come at once
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
