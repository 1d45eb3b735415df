"""Metrics out of the loop: metrics.jsonl in the run folder, plus TensorBoard / W&B when asked."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ladd.config import ConfigError, LogConfig


class MetricsLog:
    def __init__(self, out: Path, cfg: LogConfig, enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if "tensorboard" in cfg.trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log.trackers has 'tensorboard' but it is not installed: pip install tensorboard")
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in cfg.trackers:
            try:
                import wandb
            except ImportError:
                raise ConfigError("log.trackers has 'wandb' but it is not installed: pip install wandb")
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(out), name=out.name, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
