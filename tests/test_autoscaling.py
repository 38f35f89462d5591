"""The autoscaler on one machine: Ray's fake_multinode provider starts each worker
node as a raylet here, from cluster/fake_multinode.yaml (a zero-CPU head, 1-CPU workers, 6 s idle
timeout). Jobs go in with `ray job submit`, against token auth, as on a cloud cluster. A node that dies
mid-training is tests/test_elastic.py's."""

from __future__ import annotations

import collections
import shutil
import textwrap
import time

import pytest
import yaml

from cluster.storage import Storage
from ray_head import REPO, RayHead
from waiting import wait_for
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


def test_a_worker_group_that_can_never_be_placed_fails_the_job_instead_of_waiting(cluster, tmp_path):
    storage = tmp_path / "runs"
    write_tiny_dataset(Storage(str(storage)), [collections, textwrap, shutil], 33)
    started = time.monotonic()
    job = ["python", "-m", "jobs.pretrain", "--set", f"storage={storage}", "--set", "dataset=tiny", "--set",
           "name=stranded", "--set", "train.steps=4", *[a for o in TINY_GPT for a in ("--set", o)],
           "--set", "resources.cpus_per_worker=4",  # no node type has 4 CPUs: never placed
           "--set", "failure.controller_failure_limit=0", "--set", "failure.start_timeout_s=3"]
    done = cluster.submit(job, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "training failed" in log and "controller_failure_limit=0" in log, log[-3000:]
    print(f"failed after {time.monotonic() - started:.0f} s")
