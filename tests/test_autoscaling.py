"""The autoscaler and node failures on one machine: Ray's fake_multinode provider starts each worker
node as a raylet here, from cluster/fake_multinode.yaml (a zero-CPU head, 1-CPU workers, 6 s idle
timeout). Jobs go in with `ray job submit`, against token auth, as on a cloud cluster."""

from __future__ import annotations

import collections
import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cluster.storage import Storage
from ray_head import REPO, RayHead, kill_processes_marked
from waiting import reported_checkpoint, wait_for
from tiny_data import write_tiny_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # full tier: the pipeline test runs each component once in make test-fast
TINY_GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "train.micro_batch=2", "train.log_every=2",
            "train.eval_every=1000", "train.eval_batches=1", "train.shuffle_buffer=16", "optim.warmup_steps=2",
            "resources.num_workers=2", "resources.cpus_per_worker=0.5", "sample.count=0"]


@pytest.fixture(scope="module")
def cluster():
    """A zero-CPU head whose autoscaler starts cluster/fake_multinode.yaml's worker nodes; stopped after."""
    import ray._private.services as services

    head = RayHead(num_cpus=0)
    # The fake nodes share this machine's disk and one runtime_resources folder. Unpacking an uploaded
    # working dir, each new node's agent deletes and re-extracts that shared folder, and every process
    # already running in it is left in a deleted directory, where MKL aborts the first matmul ("Intel
    # oneMKL FATAL ERROR: Cannot load libtorch_cpu.so": it killed a starting Ray Train controller).
    # The repository is already on every node's disk, so jobs run in it in place, as on a shared filesystem.
    head.working_dir = f"local://{REPO}"
    config = yaml.safe_load((REPO / "cluster" / "fake_multinode.yaml").read_text())
    config["provider"]["gcs_address"] = f"{services.get_node_ip_address()}:{head.port}"
    (head.root / "fake.yaml").write_text(yaml.safe_dump(config))
    head.autoscaling_config = str(head.root / "fake.yaml")
    head.start()
    try:
        yield head
    finally:
        head.stop()
        assert not head.pids(), f"processes of the fake cluster still running: {head.pids()}"


def test_a_job_asking_for_more_cpus_than_the_head_has_gets_nodes_that_go_when_idle(cluster):
    assert cluster.alive_nodes() == 1  # the head, with 0 CPUs
    # Each task waits until both run at once (a barrier): the head has no CPU, so the autoscaler must add
    # worker CPUs for two at once. Which node each ran on is printed, not asserted: the fake provider,
    # starting two nodes at once, sometimes gives one raylet both nodes' CPUs under one node id (seen:
    # both tasks on one raylet, concurrently), which says nothing about Helio.
    script = textwrap.dedent("""
        import ray, time
        ray.init()
        @ray.remote(num_cpus=0)
        class Barrier:
            def __init__(self):
                self.arrived = {}
            def arrive(self, i, node):
                self.arrived[i] = node
            def count(self):
                return len(self.arrived)
            def nodes(self):
                return self.arrived
        barrier = Barrier.remote()
        @ray.remote(num_cpus=1, max_retries=0)  # a task that ran twice would say nothing about placement
        def where(i):
            # the raylet that started this worker is its parent: the fake provider once gave two of its
            # nodes the same node id, so the id alone could not tell them apart
            import os
            node = (ray.get_runtime_context().get_node_id(), os.getppid())
            ray.get(barrier.arrive.remote(i, node))
            deadline = time.monotonic() + 150
            while ray.get(barrier.count.remote()) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            return ray.get(barrier.count.remote()) == 2
        together = ray.get([where.remote(i) for i in range(2)])
        print("placed on (node id, raylet pid):", ray.get(barrier.nodes.remote()))
        print("both ran at once:", all(together))
    """)
    done = cluster.submit(["python", "-c", script], timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "both ran at once: True" in log, log[-3000:]
    # both workers idle now: removed after the 6 s idle timeout, back to the head alone
    wait_for("the idle workers to be removed", lambda: cluster.alive_nodes() == 1, timeout=90, every=2)


MARK = b"RAY_OVERRIDE_NODE_ID_FOR_TESTING="  # the fake provider starts each node's raylet with its id


def _node_of(pid: int) -> bytes | None:
    env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return next((e[len(MARK):] for e in env if e.startswith(MARK)), None)


def _train_worker_nodes() -> set[bytes]:
    """The fake nodes the Ray Train workers run on, read off /proc at once (no driver to start)."""
    nodes = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                nodes.add(_node_of(int(proc.name)))
        except OSError:
            pass
    return nodes - {None}


def _kill_node(node_id: bytes) -> int:
    """Kills a fake node as a machine dies: its raylet and agents (started with its id in their
    environment) and every process below them (the workers the raylet forked), all at once."""
    return kill_processes_marked(MARK + node_id)


def test_killing_a_worker_node_mid_training_resumes_from_the_last_checkpoint(cluster, tmp_path):
    import posixpath

    storage = tmp_path / "runs"
    write_tiny_dataset(Storage(str(storage)), [collections, json.decoder, posixpath, textwrap, shutil], 33)
    job = cluster.submit(["python", "-m", "jobs.pretrain", "--set", f"storage={storage}", "--set", "dataset=tiny",
                          "--set", "name=survivor", "--set", "train.steps=40", "--set", "train.checkpoint_every=10",
                          "--set", "failure.max_failures=2", *[a for o in TINY_GPT for a in ("--set", o)]],
                         timeout=0, wait=False)
    try:
        run = storage / "runs" / "survivor"
        first = wait_for("a reported checkpoint", lambda: reported_checkpoint(run), timeout=240, every=0.1,
                         job=job)
        nodes = _train_worker_nodes()
        assert nodes, "no Ray Train worker is running"
        for node in nodes:
            print(f"killing node {node.decode()}: {_kill_node(node)} processes")
        at = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        assert at < 40, "training had ended before the node was killed"
        out, _ = job.communicate(timeout=400)
        print(out[-3000:])
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40
    assert records[-1]["attempt_start_step"] >= first, records[-1]  # restarted from a checkpoint, not from 0
    assert (storage / "models" / "survivor" / "helio.json").is_file()


def test_a_worker_group_that_can_never_be_placed_fails_the_job_instead_of_waiting(cluster, tmp_path):
    storage = tmp_path / "runs"
    write_tiny_dataset(Storage(str(storage)), [collections, textwrap, shutil], 33)
    started = time.monotonic()
    job = ["python", "-m", "jobs.pretrain", "--set", f"storage={storage}", "--set", "dataset=tiny", "--set",
           "name=stranded", "--set", "train.steps=4", *[a for o in TINY_GPT for a in ("--set", o)],
           "--set", "resources.cpus_per_worker=4",  # no node type has 4 CPUs: never placed
           "--set", "failure.controller_failure_limit=1", "--set", "failure.start_timeout_s=5"]
    done = cluster.submit(job, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "training failed" in log and "controller_failure_limit=1" in log, log[-3000:]
    print(f"failed after {time.monotonic() - started:.0f} s")
