"""A throwaway S3 for tests: moto's standalone server (`moto_server`, from moto[server]) on
127.0.0.1 and a free port, with made-up credentials that the tests later search for in
every file written.

The environment it hands out (`env`) is the standard one any S3 client reads: credentials,
region and AWS_ENDPOINT_URL pointing at the server. Instance metadata lookups are switched
off, so nothing ever tries an address other than loopback.
"""
from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # Random values, so finding one in a file can only mean it was written there.
        self.key_id = "AKIA" + secrets.token_hex(8).upper()
        self.secret = secrets.token_urlsafe(30)
        self.env = {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
                    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        self.log = Path(log_dir) / "moto.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server not up after {timeout:.0f} s:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def leaks(self, roots: list[Path], texts: list[str] = ()) -> list[str]:
        """Files under `roots` (and captured `texts`) that contain a credential value."""
        needles = [self.key_id.encode(), self.secret.encode()]
        found = [f"captured output #{i}" for i, t in enumerate(texts) if any(n.decode() in t for n in needles)]
        for root in roots:
            for f in Path(root).rglob("*"):
                try:
                    if f.is_file() and not f.is_symlink() and any(n in f.read_bytes() for n in needles):
                        found.append(str(f))
                except OSError:
                    continue  # a socket or a file that went away meanwhile
        return found
