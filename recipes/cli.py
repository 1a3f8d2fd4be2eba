"""``python -m recipes {fit,validate,test,predict} --config recipes/<name>.yaml [--key value ...]``.

LightningCLI in subclass mode: any LightningModule / LightningDataModule by ``class_path``.  Every run gets

* a ``ModelCheckpoint`` writing to ``<trainer.default_root_dir>/checkpoints`` (``--checkpoint.*`` options) every
  ``every_n_train_steps`` and at the end of training, with ``last.ckpt`` a link to the newest finished checkpoint,
  so ``--ckpt_path last`` always finds it;
* a ``FiniteLossGuard`` that stops on a NaN/inf loss before the update;
* ``trainer.precision`` chosen by device when unset: ``bf16-mixed`` on CUDA, ``32-true`` elsewhere;
* errors as one line on stderr and exit code 2 (``RECIPES_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import List, Optional

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from callbacks.guards import FiniteLossGuard, NonFiniteLossError, RecipeCheckpoint

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError, ArgumentError,
               MisconfigurationException, NonFiniteLossError)


def _checkpoint_dir(root: Optional[str]) -> str:
    return os.path.join(root or os.getcwd(), "checkpoints")


class RecipeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RecipeCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.save_top_k": 1,
                             "checkpoint.every_n_train_steps": 100, "checkpoint.filename": "step{step:07d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(FiniteLossGuard, "finite_loss_guard")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.get("precision") is None:
            accel = str(cfg.trainer.get("accelerator") or "auto")
            on_gpu = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
            cfg.trainer.precision = "bf16-mixed" if on_gpu else "32-true"


def _one_line(err: BaseException) -> str:
    """One line naming the bad key and value: jsonargparse's subclass-union errors are cut to their real cause."""
    text = " ".join(str(err).split())
    section = re.match(r'Parser key "([^"]+)": ', text)
    cause = re.search(r"Expected a <class 'NoneType'> - (.*?)(?: Given value type:|$)", text)
    if cause:
        text = re.sub(r"^Problem with given class_path '[^']+': ", "", cause.group(1))
        inner = re.match(r'Parser key "([^"]+)": (.*)', text)
        where = section.group(1) if section else None
        if inner:
            where = f"{where}.{inner.group(1)}" if where else inner.group(1)
            text = inner.group(2)
        text = f"{where}: {text}" if where else text
    text = re.sub(r" - Not a valid subclass of .*$", "", text)  # jsonargparse's list of accepted forms
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("Expected a ", "expected ")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def main(args: Optional[List[str]] = None) -> int:
    debug = os.environ.get("RECIPES_DEBUG") == "1"
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        RecipeCLI(
            L.LightningModule, L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            args=args,
        )
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0
