"""Distributed strategies that the YAML recipes can name.

``BlockFSDP`` is Lightning's ``FSDPStrategy`` with the wrap policy given as class paths (YAML cannot hold a set of
classes): every module of those classes becomes one FSDP unit, e.g. each transformer block of the large FoX recipes.
FSDP needs GPUs: Lightning's accelerator connector refuses ``strategy='fsdp'`` with ``accelerator='cpu'``, and
torch's ``FullyShardedDataParallel`` (FSDP1, which Lightning's ``FSDPStrategy`` wraps) refuses CPU modules itself
("FSDP needs a non-CPU accelerator device", seen with torch 2.14 and this subclass on CPU/gloo).  ``python -m recipes``
says so in one line before starting; on CPU the large recipes' model, precision and activation checkpointing run
under DDP instead (tested).
"""
from __future__ import annotations

import importlib
from typing import List

from lightning.pytorch.strategies import FSDPStrategy


def import_class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"strategy wrap class {path!r} cannot be imported; expected a module path like "
                         "lightning_modules.fox_model.Block") from None


class BlockFSDP(FSDPStrategy):
    def __init__(self, wrap: List[str] = ("lightning_modules.fox_model.Block",), sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "sharded", limit_all_gathers: bool = True, **kwargs):
        self.wrap = list(wrap)
        super().__init__(auto_wrap_policy={import_class(p) for p in self.wrap}, sharding_strategy=sharding_strategy,
                         state_dict_type=state_dict_type, limit_all_gathers=limit_all_gathers, **kwargs)
