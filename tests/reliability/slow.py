"""Slowloris against `lmlab serve`: many connections that send their headers a line at a time and
never finish, against a server process with few file descriptors, while a client asks /health
twice a second on a new connection each time. Run once without a header deadline
(`--header-timeout 0`, what uvicorn alone does) and once with the default one.

    python -m tests.reliability slow --connections 300 --fd-limit 256 --seconds 30

Each slow connection sends `GET /health HTTP/1.1` and then one more header line every 2 s; it never
reconnects. The figures: how many the server cut (a 408, or closed) and after how long, how many
were still open at the end, and how many of the client's requests were answered.
"""

from __future__ import annotations

import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(port: int, timeout: float) -> float | None:
    """Seconds for /health on a new connection, or None if no 200 came within `timeout`."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n")
            got = s.recv(64)
            return time.monotonic() - t0 if got.startswith(b"HTTP/1.1 200") else None
    except OSError:
        return None


def attack(model: Path, connections: int, fd_limit: int, seconds: float, header_timeout: float) -> dict[str, Any]:
    port = _free_port()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    cmd = [sys.executable, "-m", "lmlab", "serve", "--model", str(model), "--port", str(port), "--threads", "1"]
    cmd += ["--header-timeout", str(header_timeout), "--dtype", "float32"]
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would block the server on its own log
    proc = subprocess.Popen(cmd, preexec_fn=limit, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while _probe(port, 1.0) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the server did not start: {log.read().decode()[-2000:]}")
            time.sleep(0.2)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, connections + 256)), hard))
        sel = selectors.DefaultSelector()
        opened: dict[socket.socket, float] = {}
        cut: list[float] = []
        got_408 = 0
        start = time.monotonic()
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            s.setblocking(False)
            opened[s] = time.monotonic()
            sel.register(s, selectors.EVENT_READ)
        probes: list[tuple[float, float | None]] = []
        next_line, next_probe, line = time.monotonic() + 2, time.monotonic(), 0
        while time.monotonic() - start < seconds:
            for key, _ in sel.select(timeout=0.05):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                got_408 += data.startswith(b"HTTP/1.1 408")
                sel.unregister(s)
                s.close()
                cut.append(time.monotonic() - opened.pop(s))
            now = time.monotonic()
            if now >= next_line:  # one more header line on every connection still open
                line += 1
                for s in list(opened):
                    try:
                        s.send(b"x-slow-%d: y\r\n" % line)
                    except OSError:
                        pass
                next_line = now + 2
            if now >= next_probe:
                probes.append((now - start, _probe(port, 0.5)))
                next_probe = time.monotonic() + 0.5
        still_open = len(opened)
        for s in opened:
            s.close()
        answered = [t for _, t in probes if t is not None]
        gap, last = 0.0, 0.0  # the longest stretch with no answered probe
        for at, t in probes:
            if t is not None:
                gap, last = max(gap, at - last), at
        gap = max(gap, seconds - last)
        return {
            "header_timeout": header_timeout,
            "connections": connections,
            "fd_limit": fd_limit,
            "seconds": seconds,
            "cut": len(cut),
            "cut_with_408": got_408,
            "cut_after_median_s": round(statistics.median(cut), 2) if cut else None,
            "cut_after_max_s": round(max(cut), 2) if cut else None,
            "still_open": still_open,
            "probes": len(probes),
            "probes_answered": len(answered),
            "longest_unanswered_s": round(gap, 1),
            "server_alive": proc.poll() is None,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def campaign(work: Path, connections: int, fd_limit: int, seconds: float, header_timeout: float) -> list[dict]:
    from .server import folder

    model = folder(work)
    return [attack(model, connections, fd_limit, seconds, t) for t in (0.0, header_timeout)]
