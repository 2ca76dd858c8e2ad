"""What the 2-process DDP tests' probe callbacks share: each rank's report written beside the run.

Not a test module: the ``ddp_probe`` fixture (``tests/conftest.py``) copies this file into the run's folder, which the
CLI subprocess has on its ``PYTHONPATH``, so a recipe names ``ddp_probe.SaveRankState`` and a test's own probe module
imports these helpers.
"""

import os

import torch
from lightning.pytorch import Callback


def state_of(module: torch.nn.Module) -> dict:
    """A CPU copy of every tensor of ``module``'s state dict."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def held_params(trainer) -> list:
    """Every parameter the trainer's optimizers hold."""
    return [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]


def stale_optimizer_params(trainer, pl_module) -> int:
    """How many parameters the optimizers hold that the module no longer has (0 after a correct shape change)."""
    ids = {id(p) for p in pl_module.parameters()}
    return sum(id(p) not in ids for p in held_params(trainer))


def ddp_wrapped_params(trainer) -> int:
    """How many parameter values the strategy's (DDP) model holds."""
    return sum(p.numel() for p in trainer.strategy.model.parameters())


def save_rank_report(trainer, report: dict, out_dir: str) -> None:
    """``report`` as ``<out_dir>/rank<r>.pt``, written atomically (the test reads both ranks' files)."""
    path = os.path.join(out_dir, f"rank{trainer.global_rank}.pt")
    torch.save(report, path + ".tmp")
    os.replace(path + ".tmp", path)


class SaveRankState(Callback):
    """Each rank writes its module's state dict at train end, with how many optimizer parameters are stale and how
    many parameter values DDP wraps (for the test to compare across ranks)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        state = state_of(pl_module)
        state["stale_optimizer_params"] = torch.tensor(stale_optimizer_params(trainer, pl_module))
        state["ddp_wrapped_params"] = torch.tensor(ddp_wrapped_params(trainer))
        save_rank_report(trainer, state, self.out_dir)
