"""A throwaway Ray cluster for tests: `ray start --head --block` on 127.0.0.1 only, and
optionally a second node (RayNode) joining it on the same machine, also on loopback.

Everything it starts lives under its own --temp-dir and its own ports, so it never meets
another Ray on this machine (no shared /tmp/ray/ray_current_cluster, no default ports).
It is stopped through its own `ray start` process (SIGTERM: Ray drains and stops the node's
processes), then anything left of it is killed by pid. Never `ray stop`: that kills every
Ray process on the machine, other people's included.
"""
from __future__ import annotations

import json
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
    def __init__(self, num_cpus: int = 2, token: str | None = None, env: dict | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="castray-", dir="/tmp"))  # short: unix socket paths
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.gcs_port, self.dashboard_port = ports["--port"], ports["--dashboard-port"]
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = token
        env = clean_env(
            RAY_worker_niceness="0",  # Ray nices workers to 15 by default
            # A joining node gives up after Ray's own 30 s wait for its registration, which a
            # loaded 2-core machine can exceed; RayNode.wait_joined allows 120 s, so Ray does too.
            RAY_raylet_start_wait_time_s="120",
            # Without this Ray swaps 127.0.0.1 for the machine's outward IP and talks to itself there.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="token" if token else "disabled",
            CAST_TEST_RAY_HEAD=str(self.tmp),
            **({"RAY_AUTH_TOKEN": token} if token else {}), **(env or {}))
        self.env = env
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

    def api(self, path: str):
        """GET a dashboard endpoint (with the token), as JSON."""
        req = urllib.request.Request(f"{self.wait_ready()}{path}",
                                     headers={"Authorization": f"Bearer {self.token}"} if self.token else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        """Alive nodes: {"id", "ip", "resources"} each."""
        rows = self.api("/nodes?view=summary")["data"]["summary"]
        return [{"id": r["raylet"]["nodeId"], "ip": r["raylet"].get("nodeManagerAddress"),
                 "resources": r["raylet"].get("resourcesTotal", {})}
                for r in rows if r["raylet"].get("state") == "ALIVE"]

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


# `ray start --address` refuses to start a worker node when Ray believes clustering is off,
# and we need every other part of Ray to believe it (otherwise it swaps 127.0.0.1 for the
# machine's outward address and connects there, see RayHead). So in the CLI process the
# switch reads "on" for that one check in `start` and "off" everywhere else; the node's
# own processes inherit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
_JOIN = """
import sys
from ray._private import ray_constants
class OnlyForStartsCheck:
    def __bool__(self):
        return sys._getframe(1).f_code.co_name == "start"
ray_constants.ENABLE_RAY_CLUSTER = OnlyForStartsCheck()
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""


class RayNode:
    """A second node of `head`'s cluster on this machine: its own ports and CPUs, a custom
    resource of its own (a name without "_": the dashboard camel-cases keys), and the head's
    environment (auth token, marker, extra env), so head.stop() also finds what is left of it."""

    PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")

    def __init__(self, head: RayHead, num_cpus: int = 1, resources: dict | None = None):
        self.head, self.resources = head, resources or {}
        head.wait_ready()
        cmd = [sys.executable, "-c", _JOIN, "start", "--block", "--address", f"127.0.0.1:{head.gcs_port}",
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--resources", json.dumps(self.resources), "--object-store-memory", str(100 * 2**20),
               "--disable-usage-stats"]
        for flag, port in zip(self.PORTS, free_ports(len(self.PORTS))):
            cmd += [flag, str(port)]
        self.log = head.tmp / "ray-node.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=head.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=head.tmp)

    def wait_joined(self, timeout: float = 120.0) -> dict:
        """This node as the head lists it, once it is alive there."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start (node) exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            mine = [n for n in self.head.nodes() if all(n["resources"].get(k) == v for k, v in self.resources.items())
                    and self.resources]
            if mine:
                return mine[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the second Ray node did not join in {timeout:.0f} s:\n"
                                   f"{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains and stops this node's processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
