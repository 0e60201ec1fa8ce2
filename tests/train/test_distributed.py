"""The training passes under torchrun: 2 processes (gloo, CPU) with DistributedDataParallel reach the weights one
process reaches on the same batches (each process trains on half of every batch)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ddp_job
import torch

HERE = Path(__file__).parent


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_job.py"), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    distributed = torch.load(out)
    torch.set_num_threads(1)
    for name, step in ddp_job.STEPS.items():
        single = ddp_job.job(step)
        assert distributed[name]["stats"]["processes"] == 2 and "processes" not in single["stats"]
        assert distributed[name]["stats"]["samples"] * 2 == single["stats"]["samples"]
        for key, value in single["state"].items():
            torch.testing.assert_close(distributed[name]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
