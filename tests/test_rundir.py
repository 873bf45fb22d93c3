"""One owner and one history per run directory: the lock, refusals of wrong places, overwrite,
and resume without a checkpoint — all before any model loads."""

import subprocess
import sys
import textwrap

import pytest

from grpo_mlx import rundir
from grpo_mlx.config import DEMO_DATA, DEMO_MODEL, build_config
from grpo_mlx.rundir import RunDirError, RunLock, claim


def cfg_for(path, **kw):
    return build_config({"adapter_path": str(path), **kw})


def test_claim_locks_and_a_second_claim_names_the_holder(tmp_path):
    lock = claim(cfg_for(tmp_path / "run"), tmp_path / "run")
    try:
        # a second process on the same directory is refused, naming the first one's pid
        code = textwrap.dedent(f"""
            from grpo_mlx.rundir import RunLock, RunDirError
            import pathlib
            try:
                RunLock(pathlib.Path({str(tmp_path / "run")!r})).acquire()
            except RunDirError as e:
                print(e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
        import os

        assert "another trainer" in out and f"pid {os.getpid()}" in out
    finally:
        lock.release()
    RunLock(tmp_path / "run").acquire().release()  # released: free again


def test_a_crashed_owner_releases_the_lock(tmp_path):
    (tmp_path / "run").mkdir()
    code = (
        "from grpo_mlx.rundir import RunLock; import pathlib, os; "
        f"RunLock(pathlib.Path({str(tmp_path / 'run')!r})).acquire(); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9
    RunLock(tmp_path / "run").acquire().release()


def test_a_directory_with_a_run_is_refused_with_both_ways_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError) as e:
        claim(cfg_for(run), run)
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)


def test_overwrite_clears_only_the_runs_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "checkpoints" / "step_0000002" / "state.json").write_text("{}")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    claim(cfg_for(run, overwrite=True), run).release()
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["model", "model/sub", "data", "data/x/y"])
def test_inside_model_or_data_is_refused(where, tmp_path):
    target = {"model": DEMO_MODEL, "data": DEMO_DATA}[where.split("/")[0]]
    path = f"{target}/{where.split('/', 1)[1]}" if "/" in where else target
    with pytest.raises(RunDirError, match=f"inside the {where.split('/')[0]} directory"):
        claim(cfg_for(path), path)
    assert not (tmp_path / "sub").exists()


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        claim(cfg_for(tmp_path / "f"), tmp_path / "f")


def test_resume_without_checkpoint_is_refused_before_loading(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    cfg = cfg_for(tmp_path / "run")
    cfg.resume = str(tmp_path / "run")
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        claim(cfg, tmp_path / "run")


def test_unwritable_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        with pytest.raises(RunDirError, match="cannot write there"):
            claim(cfg_for(ro / "run"), ro / "run")
    finally:
        subprocess.run(["umount", str(ro)])


def test_has_checkpoint_needs_a_complete_one(tmp_path):
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    assert not rundir.has_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "step_0000001" / "state.json").write_text("{}")
    assert rundir.has_checkpoint(tmp_path)
