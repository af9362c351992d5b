"""Start and stop a real MONAI Label server (``monailabel start_server``) for integration tests."""

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

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "ragseg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A MONAI Label server subprocess on loopback, stopped by PID (its whole process group)."""

    def __init__(self, studies: Path, log: Path, conf: dict[str, str] | None = None, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.studies, self.log = Path(studies), Path(log)
        self.extra_env = env or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = conf or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0, studies_override: str | None = None) -> Server:
        """Start and wait for /info. ``studies_override``: e.g. a DICOMweb URL instead of a folder."""
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
               "--studies", studies_override or str(self.studies), "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **self.extra_env}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.studies.parent), start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.get("/info/", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if getattr(self, "_fh", None):
            self._fh.close()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- HTTP helpers -----------------------------------------------------------------------------
    def request(self, method: str, path: str, *, fields: dict | None = None, files: dict | None = None,
                json_body: dict | None = None, timeout: float = 600.0) -> tuple[int, bytes, dict]:
        """Multipart, JSON or empty request -> (status, body, headers); 4xx/5xx are returned, not raised."""
        body, headers = b"", {}
        if json_body is not None:
            body, headers = json.dumps(json_body).encode(), {"Content-Type": "application/json"}
        elif fields or files:
            boundary = "----ragsegtest" + os.urandom(8).hex()
            parts = []
            for k, v in (fields or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
            for k, (name, data) in (files or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        req = urllib.request.Request(self.url + path, data=body if method != "GET" else None, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, bytes, dict]:
        return self.request("GET", path, timeout=timeout)

    def info(self) -> dict:
        status, body, _ = self.get("/info/")
        assert status == 200, body
        return json.loads(body)

    def wait_for(self, predicate, timeout: float = 120.0, interval: float = 0.5):
        end = time.time() + timeout
        last = None
        while time.time() < end:
            last = self.info()
            if predicate(last):
                return last
            time.sleep(interval)
        raise AssertionError(f"condition not met in {timeout}s; last /info ragseg: "
                             f"{json.dumps(last.get('ragseg') if last else None)[:2000]}\n{self.tail(30)}")
