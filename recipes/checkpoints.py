"""Checkpoints given to ``--ckpt_path``: found, read once, checked, and their model settings applied.

Lightning's CLI re-applies *every* init argument stored in a checkpoint *file* (and none for ``last``), over what
the user typed.  The recipes do it per model instead, the same for a file and for ``last``:

* a model class that declares ``ARCHITECTURE`` (the init arguments that shape its state dict) gets exactly those
  from the checkpoint -- the network must match the weights -- and keeps the command line's value for everything
  else (learning rate, attention backend, generation settings);
* other models get all of them, as Lightning does.

A checkpoint of another recipe (its model class differs from the recipe's) and a file that cannot be read
(truncated, corrupt) each stop with one line; the latter names the newest readable checkpoint beside it.
"""
from __future__ import annotations

import glob
import importlib
import os
from typing import Optional

import torch


def read_checkpoint(path: str) -> dict:
    """The checkpoint at ``path`` (tensors memory-mapped), or one ``ValueError`` naming it and the newest readable
    checkpoint in the same folder."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError / EOFError / UnpicklingError / zip errors
        reason = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__
        other = newest_readable(os.path.dirname(os.path.abspath(path)), exclude=path)
        hint = f"the newest readable checkpoint beside it is {other}" if other else \
            "no other readable checkpoint is beside it"
        shown = f"{path} -> {os.path.realpath(path)}" if os.path.islink(path) else path
        raise ValueError(f"checkpoint {shown} cannot be read (truncated or corrupt: {reason}); {hint}") from None


def newest_readable(folder: str, exclude: Optional[str] = None) -> Optional[str]:
    """The most recently written ``*.ckpt`` in ``folder`` that loads (links to ``exclude`` skipped), or None."""
    bad = os.path.realpath(exclude) if exclude else None
    files = [f for f in glob.glob(os.path.join(folder, "*.ckpt")) if os.path.realpath(f) != bad]
    for f in sorted(files, key=lambda f: os.path.getmtime(os.path.realpath(f)), reverse=True):
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            return f
        except Exception:  # noqa: BLE001
            continue
    return None


def resolve(ckpt_path: str, checkpoint_dir: Optional[str], name: str = "ckpt_path") -> Optional[str]:
    """The file ``ckpt_path`` names: a path, or ``last`` -> ``<checkpoint dir>/last.ckpt`` when it exists.  None for
    Lightning's other words (``best``, ``hpc``, ``registry``) and for ``last`` before any checkpoint exists."""
    if ckpt_path == "last":
        last = os.path.join(checkpoint_dir or "", "last.ckpt")
        return last if checkpoint_dir and os.path.exists(last) else None
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
        return None
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"{name} {ckpt_path!r} does not exist; pass a checkpoint file or 'last'")
    if os.path.isdir(ckpt_path):
        raise ValueError(f"{name} {ckpt_path!r} is a folder; pass a checkpoint file in it or 'last'")
    return ckpt_path


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def model_settings(checkpoint: dict, path: str, model_class_path: Optional[str]) -> dict:
    """The init arguments to take from ``checkpoint`` for the recipe's model (see the module docstring)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    saved_class = hparams.pop("_class_path", None)
    if saved_class and model_class_path and saved_class != model_class_path:
        raise ValueError(f"checkpoint {path} holds a {saved_class} model but this recipe's model is "
                         f"{model_class_path}; pass a checkpoint written by this recipe")
    if not hparams or not model_class_path:
        return hparams
    keys = getattr(_import(model_class_path), "ARCHITECTURE", None)
    return hparams if keys is None else {k: hparams[k] for k in keys if k in hparams}
