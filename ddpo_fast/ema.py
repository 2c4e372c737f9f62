"""An exponential moving average of the trained weights (LoRA or the full UNet).

The average is kept in float32 beside the module, updated after every `update_every` optimizer
steps, saved in each checkpoint (so a resumed run continues it exactly), and swapped into the module
for an evaluation or for the final model."""
from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, update_every: int):
        self.decay, self.update_every = decay, update_every
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.average = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.optimizer_steps = 0

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.update_every == 0:
            for name, p in self.params.items():
                self.average[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The module holds the average inside the block, its own weights again after it."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"average": {n: t.cpu() for n, t in self.average.items()}, "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.average) ^ set(state["average"])
        if missing:
            raise ValueError(f"the checkpoint's EMA does not match the trained parameters ({len(missing)} differ, "
                             f"e.g. {sorted(missing)[0]})")
        for name, value in state["average"].items():
            self.average[name].copy_(value)
        self.optimizer_steps = state["optimizer_steps"]
