"""A real Ray head started with `ray start --head` (token auth on) beside the session's embedded cluster.

`ray stop` would stop every Ray on the machine, the test session's own cluster too, so a head is
started with a token file and a temp dir of its own and stopped by ending exactly the processes that
belong to it: those whose environment names that token file or whose command line names that
folder (the head's, its fake worker nodes', every worker's: they all inherit the head's environment).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tiny_data import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ray and python: what a job's `python` must be


class RayHead:
    def __init__(self, num_cpus: int = 2, autoscaling_config: str | None = None, quick_node_death: bool = False):
        # a short folder of its own: Ray's socket paths under it must stay within 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="hh", dir="/tmp"))
        self.temp_dir = self.root / "ray"
        self.token = self.root / "auth_token"
        self.token.write_text("helio-test-" + os.urandom(16).hex())
        self.port, self.dashboard_port = free_port(), free_port()
        self.num_cpus, self.autoscaling_config = num_cpus, autoscaling_config
        self.quick_node_death = quick_node_death or autoscaling_config is not None
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.working_dir = str(REPO)  # uploaded by `ray job submit`, unpacked on each node

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), PATH=f"{BIN}:{env.get('PATH', '')}",
                   RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def start(self) -> "RayHead":
        cmd = [str(BIN / "ray"), "start", "--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
               "--dashboard-host=127.0.0.1", f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}",
               # the agent's default port (52365) is taken while the session's own cluster runs
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        extra = {}
        if self.quick_node_death:  # a killed node is declared dead after ~3 s of failed health checks, not ~20 s
            extra = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3"}
        if self.autoscaling_config:
            cmd.append(f"--autoscaling-config={self.autoscaling_config}")
            extra |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        done = subprocess.run(cmd, env=self.env(**extra), capture_output=True, text=True, timeout=120)
        if done.returncode:
            self.stop()
            raise RuntimeError(f"ray start failed: {done.stderr[-3000:]}")
        self.wait_for_job_api()
        return self

    def wait_for_job_api(self, timeout: float = 90) -> None:
        """Until the head's job agent takes a job ("No available agent" for a few seconds after start)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.cli("job", "submit", "--address", self.address, "--no-wait", "--", "true")
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job API of {self.address} never took a job: {done.stderr[-2000:]}")
            time.sleep(1)

    def add_nodes(self, *names: str, num_cpus: int = 1) -> None:
        """Starts worker nodes on this machine (a raylet each) joined to this head; a node's processes, and
        every worker it starts, carry HELIO_TEST_NODE=name in their environment (`kill_node`). One at a
        time: two `ray start`s at once on one address time out waiting for their own node to register."""
        for name in names:
            cmd = [str(BIN / "ray"), "start", f"--address={self.gcs_address()}", f"--num-cpus={num_cpus}",
                   f"--temp-dir={self.temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                   "--disable-usage-stats"]
            done = subprocess.run(cmd, env=self.env(HELIO_TEST_NODE=name), capture_output=True, text=True,
                                  timeout=120)
            if done.returncode:
                raise RuntimeError(f"ray start (node {name}) failed: {done.stderr[-3000:]}")

    def kill_node(self, name: str) -> int:
        """Kills a node added by `add_node` as a machine dies: every process of it at once; returns how many."""
        return kill_processes_marked(f"HELIO_TEST_NODE={name}".encode())

    def gcs_address(self) -> str:
        """host:port of the head's GCS (the address `ray start` chose to advertise)."""
        return (self.temp_dir / "ray_current_cluster").read_text().strip()

    def submit(self, entrypoint: list[str], timeout: float, runtime_env: dict | None = None,
               wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
        """`ray job submit --working-dir <repo> -- ENTRYPOINT`, as a user runs it (following the logs).

        Following the logs over the dashboard's WebSocket can end before the job's last lines arrive,
        so a waited-for job's stdout ends with the whole log as `ray job logs` gives it afterwards."""
        submission = f"helio-test-{os.urandom(6).hex()}"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", self.working_dir,
               "--submission-id", submission]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        cmd += ["--", *entrypoint]
        if not wait:
            return subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        logs = self.cli("job", "logs", "--address", self.address, submission)
        done.stdout += f"\n--- ray job logs {submission} ---\n{logs.stdout}{logs.stderr}"
        return done

    def cli(self, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def alive_nodes(self) -> int:
        """Alive nodes, asked from a separate driver (this process is connected to another cluster)."""
        code = (f"import ray; ray.init(address={self.gcs_address()!r}, logging_level='ERROR'); "
                "print('alive nodes:', sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        # the driver also prints the autoscaler's events ("(autoscaler +0s) Resized to 0 CPUs.")
        return int(next(line for line in out.stdout.splitlines() if line.startswith("alive nodes:")).split()[-1])

    def stop(self) -> None:
        """Ends every process whose command line names this head's temp dir, then waits for them."""
        pids = self.pids()
        # 3 s to exit on SIGTERM (a test head keeps nothing worth a longer wait), then SIGKILL
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while (pids := self.pids()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.root, ignore_errors=True)

    def pids(self) -> list[int]:
        folder, token = str(self.temp_dir).encode(), f"RAY_AUTH_TOKEN_PATH={self.token}".encode()
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if folder in (proc / "cmdline").read_bytes() or token in (proc / "environ").read_bytes().split(b"\0"):
                    out.append(int(proc.name))
            except OSError:
                pass
        return out


def kill_processes_marked(entry: bytes) -> int:
    """SIGKILLs, all at once, every process with `entry` (NAME=value) in its environment and every process
    below them; returns how many. A node's raylet and agents carry its mark, and the workers the raylet
    forked inherit it."""
    parents: dict[int, int] = {}
    doomed: set[int] = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if entry in (proc / "environ").read_bytes().split(b"\0"):
                    doomed.add(int(proc.name))
        except OSError:
            pass
    while grown := {pid for pid, ppid in parents.items() if ppid in doomed and pid not in doomed}:
        doomed |= grown
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(doomed)
