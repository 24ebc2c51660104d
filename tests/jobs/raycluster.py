"""A throwaway Ray head for tests: `ray start --head --block` on 127.0.0.1 only.

Everything it starts lives under its own --temp-dir and its own ports, so it never meets
another Ray on this machine (no shared /tmp/ray/ray_current_cluster, no default ports).
It is stopped through its own `ray start` process (SIGTERM: Ray drains and stops the node's
processes), then anything left of it is killed by pid. Never `ray stop`: that kills every
Ray process on the machine, other people's included.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict:
    """This environment without any Ray address or auth settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class RayHead:
    def __init__(self, num_cpus: int = 2, token: str | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="castray-", dir="/tmp"))  # short: unix socket paths
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.gcs_port, self.dashboard_port = ports["--port"], ports["--dashboard-port"]
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = token
        env = clean_env(
            RAY_worker_niceness="0",  # Ray nices workers to 15 by default
            # Without this Ray swaps 127.0.0.1 for the machine's outward IP and talks to itself there.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="token" if token else "disabled",
            CAST_TEST_RAY_HEAD=str(self.tmp),
            **({"RAY_AUTH_TOKEN": token} if token else {}))
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
               "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
               "--temp-dir", str(self.tmp), "--disable-usage-stats"]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        self.log = self.tmp / "ray-start.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.tmp)
        self._ready = False

    def wait_ready(self, timeout: float = 120.0) -> str:
        """The dashboard URL once it answers; a clear failure with the log otherwise."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{self.url}/api/version",
                                             headers={"Authorization": f"Bearer {self.token}"} if self.token else {})
                with urllib.request.urlopen(req, timeout=2) as r:
                    self._ready = r.status == 200
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray dashboard not up after {timeout:.0f} s:\n"
                                       f"{self.log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        return self.url

    def leftovers(self) -> list[int]:
        """Pids of processes of this head: its temp dir in their command line, or its marker in
        their environment (workers rename themselves `ray::...`, but inherit the environment)."""
        marker = f"CAST_TEST_RAY_HEAD={self.tmp}".encode()
        mine = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if str(self.tmp).encode() in cmdline or marker in environ.split(b"\0"):
                mine.append(int(pid))
        return mine

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # ray start --block drains and stops its processes
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group
                    self.proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while self.leftovers() and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid in self.leftovers():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
