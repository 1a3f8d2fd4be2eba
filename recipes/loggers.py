"""Loggers for the recipes.  ``RecipeWandbLogger`` is Lightning's ``WandbLogger`` that runs offline unless W&B
credentials are present, so a recipe with W&B logging needs no network or account:

    python -m recipes fit --config recipes/fox_lm.yaml --config recipes/loggers/wandb.yaml

``offline=None`` (default): offline when ``WANDB_API_KEY`` is unset and ``~/.netrc`` holds no api.wandb.ai login and
``WANDB_MODE`` is not set; ``WANDB_MODE`` (``online`` / ``offline`` / ``disabled``) always wins.  Offline runs can be
uploaded later with ``wandb sync``.  ``log_model=True`` uploads checkpoints as artifacts (Lightning's option).
"""
from __future__ import annotations

import os
from typing import Optional

from lightning.pytorch.loggers import WandbLogger


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, errors="ignore").read()


class RecipeWandbLogger(WandbLogger):
    def __init__(self, project: str = "paper-recipes", save_dir: str = "runs/wandb", offline: Optional[bool] = None,
                 log_model: bool = False, name: Optional[str] = None, **kwargs):
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not has_wandb_credentials()
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, log_model=log_model, name=name,
                         **kwargs)
