"""Run by tests/train/test_distributed.py under torchrun (and in-process): finetune, distill and nas on a small model;
rank 0 saves the trained weights to the path given as the first argument."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

import fxcompress as fxc


def job(step: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]
    result = fxc.compile(model, (data[0][0][:1],), [step], train_data=data)
    return {"state": result.module.state_dict(), "stats": result.history[-1].stats}


STEPS = {"finetune": {"pass": "finetune", "epochs": 2, "lr": 0.05},
         "distill": {"pass": "distill", "epochs": 2, "lr": 0.05, "features": [["3", "3"]]},
         "nas": {"pass": "nas", "budget": {"macs": 0.5}, "epochs": 2, "lr": 0.05, "population": 6, "generations": 2}}

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {name: job(step) for name, step in STEPS.items()}
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
