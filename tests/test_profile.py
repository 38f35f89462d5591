"""cluster/profile.py: rank 0 records the steps after the warm-up and writes a per-step op table; every
other rank, and a run without HELIO_PROFILE_DIR, writes nothing."""

from __future__ import annotations

import json

import torch

from cluster.profile import ENV, SKIP, STEPS, StepProfile


def _steps(recorder: StepProfile, start: int, n: int) -> None:
    a = torch.randn(64, 64)
    for step in range(start, start + n):
        recorder.tick(step)
        a = torch.tanh(a @ a) if step < start + SKIP else (a @ a).relu()
    recorder.close(start + n)


def test_rank_zero_writes_the_op_table_of_the_steps_after_warm_up(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "r0"))
    _steps(StepProfile(0, start_step=3), 3, SKIP + STEPS + 4)
    table = json.loads((tmp_path / "r0" / "profile.json").read_text())
    assert table["steps"] == STEPS and table["ms_per_step"] > 0
    assert "aten::relu" in table["ops"] and "aten::tanh" not in table["ops"]  # warm-up steps left out
    assert list(table["ops"].values()) == sorted(table["ops"].values(), reverse=True)
    assert "aten::mm" in (tmp_path / "r0" / "profile.txt").read_text()


def test_other_ranks_and_unprofiled_runs_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "r1"))
    _steps(StepProfile(1, start_step=0), 0, SKIP + STEPS + 1)
    monkeypatch.delenv(ENV)
    _steps(StepProfile(0, start_step=0), 0, SKIP + STEPS + 1)
    assert not (tmp_path / "r1").exists() and list(tmp_path.iterdir()) == []


def test_a_run_shorter_than_the_window_writes_what_it_recorded(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path))
    _steps(StepProfile(0, start_step=0), 0, SKIP + 2)
    assert json.loads((tmp_path / "profile.json").read_text())["steps"] == 2
