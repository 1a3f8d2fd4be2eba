"""``python -m recipes {fit,validate,test,predict} --config recipes/<name>.yaml [--key value ...]``; ``python -m
recipes ls [--json]`` lists the recipes (``recipes/catalog.py``).

LightningCLI in subclass mode: any LightningModule / LightningDataModule by ``class_path``.  Every run gets

* a ``ModelCheckpoint`` writing to ``<trainer.default_root_dir>/checkpoints`` (``--checkpoint.*`` options) every
  ``every_n_train_steps`` and at the end of training, with ``last.ckpt`` a link to the newest finished checkpoint,
  so ``--ckpt_path last`` always finds it;
* a ``FiniteLossGuard`` that stops on a NaN/inf loss before the update;
* ``trainer.precision`` chosen by device when unset: ``bf16-mixed`` on CUDA, ``32-true`` elsewhere;
* ``--ckpt_path`` (a file or ``last``) read once and checked: the model's architecture from the checkpoint, the
  rest from the command line (``recipes.checkpoints``);
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
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.guards import FiniteLossGuard, NonFiniteLossError, RecipeCheckpoint
from callbacks.preemption import PREEMPTED_EXIT_CODE, Preempted, end_preempted_run, watch_slurm_signals
from callbacks.run_files import run_dir
from callbacks.wandb_media import LogPlotsToWandb
from recipes import checkpoints

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError, ArgumentError,
               MisconfigurationException, NonFiniteLossError)


def _checkpoint_dir(root: Optional[str]) -> str:
    return os.path.join(root or os.getcwd(), "checkpoints")


class RecipeSaveConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's log folder (rank 0, no collective, overwriting: a
    second run in the same folder never fails) and logs it whole to W&B when a ``WandbLogger`` is in use."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        self.parser.save(self.config, os.path.join(out, self.config_filename), skip_none=False, overwrite=True,
                         multifile=self.multifile)
        self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import yaml

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                logger.experiment.config.update({"recipe": config}, allow_val_change=True)


class RecipeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RecipeCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.save_top_k": 1,
                             "checkpoint.every_n_train_steps": 100, "checkpoint.filename": "step{step:07d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(FiniteLossGuard, "finite_loss_guard")

    def _parse_ckpt_path(self) -> None:
        """See ``recipes.checkpoints``: a checkpoint file and ``last`` are treated alike, unreadable files and
        checkpoints of another recipe stop with one line, and only the model's architecture comes from it."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        model = cfg.get("model")
        class_path = getattr(model, "class_path", None) if model is not None else None
        init_from = getattr(getattr(model, "init_args", None), "init_from", None) if model is not None else None
        ckpt = cfg.get("ckpt_path") or init_from  # fine-tuning from weights: the same architecture rule
        if not ckpt:
            return
        name = "ckpt_path" if cfg.get("ckpt_path") else "model.init_from"
        path = checkpoints.resolve(str(ckpt), cfg.get("checkpoint", {}).get("dirpath"), name)
        if path is None:
            return
        settings = checkpoints.model_settings(checkpoints.read_checkpoint(path), path, class_path)
        if settings and class_path:
            self.config = self.parser.parse_object(
                {sub: {"model": {"class_path": class_path, "init_args": settings}}}, self.config)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        accel = str(cfg.trainer.get("accelerator") or "auto")
        on_gpu = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
        if cfg.trainer.get("precision") is None:
            cfg.trainer.precision = "bf16-mixed" if on_gpu else "32-true"
        check_hardware(accel, cfg.trainer.get("strategy"), on_gpu)
        check_scale(cfg.trainer.get("devices"), cfg.trainer.get("num_nodes") or 1, on_gpu)
        _per_run_dir(cfg)
        _wandb_under_sweep_agent(cfg)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if any(isinstance(lg, WandbLogger) for lg in self.trainer.loggers):
            self.trainer.callbacks.append(LogPlotsToWandb())

    def _finish_wandb(self) -> None:
        """Close the W&B run when the subcommand ends, so a second run in the same process starts its own."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger._experiment.finish()
                logger._experiment = None

    after_fit = after_validate = after_test = after_predict = _finish_wandb


def _per_run_dir(cfg) -> None:
    """Under a sweep (``RECIPES_RUN_ID``, or the W&B agent's ``WANDB_RUN_ID`` with ``WANDB_SWEEP_ID``), each run gets
    ``<default_root_dir>/<run id>`` (checkpoints, logs and reports), so runs of one recipe never share a folder."""
    run_id = os.environ.get("RECIPES_RUN_ID") or (os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID")
                                                  else None)
    if not run_id:
        return
    root = cfg.trainer.get("default_root_dir") or os.getcwd()
    new = os.path.join(root, run_id)
    cfg.trainer.default_root_dir = new
    cfg.checkpoint.dirpath = _checkpoint_dir(new)
    loggers = cfg.trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = getattr(logger, "init_args", None)
        if init is not None and init.get("save_dir") in (root, root.rstrip("/")):
            init.save_dir = new


def _wandb_under_sweep_agent(cfg) -> None:
    """A run started by ``wandb agent`` (``WANDB_SWEEP_ID`` set) must report to its sweep: when the recipe logs
    elsewhere only (the default CSV logger), a ``RecipeWandbLogger`` is added after it (the CSV logger keeps the run's
    folder for reports), saving under ``<default_root_dir>/wandb``; ``wandb.init`` then joins the agent's run."""
    if not os.environ.get("WANDB_SWEEP_ID"):
        return
    from jsonargparse import Namespace

    loggers = cfg.trainer.get("logger")
    if loggers is False:
        return
    current = [] if loggers in (None, True) else list(loggers) if isinstance(loggers, list) else [loggers]
    if any("Wandb" in str(getattr(lg, "class_path", "")) for lg in current):
        return
    root = cfg.trainer.get("default_root_dir") or os.getcwd()
    wandb = Namespace(class_path="recipes.loggers.RecipeWandbLogger",
                      init_args=Namespace(save_dir=os.path.join(root, "wandb")))
    cfg.trainer.logger = [*current, wandb]


def check_hardware(accelerator: str, strategy, on_gpu: bool) -> None:
    """A GPU-only setting on a machine without CUDA fails in one line before anything starts: ``accelerator=gpu``,
    and FSDP strategies (torch's FSDP refuses CPU devices: "FSDP needs a non-CPU accelerator device")."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; on CPU run "
                         "--trainer.accelerator=cpu")
    name = str(getattr(strategy, "class_path", strategy) or "")
    if "fsdp" in name.lower() and not on_gpu:
        raise ValueError(f"trainer.strategy={name} shards with torch FSDP, which needs CUDA GPUs; on CPU run "
                         "--trainer.strategy=ddp (same model, precision and activation checkpointing)")


def check_scale(devices, num_nodes: int, on_gpu: bool) -> None:
    """Device and node counts that cannot run here fail before any process starts, in one line."""
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        n = int(devices)
        have = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
        if n > have:
            kind = "GPUs" if on_gpu else "CPU cores (one process each)"
            raise ValueError(f"trainer.devices={n} but this machine has {have} {kind}")
        per_node = n
    else:
        per_node = None
    nodes = os.environ.get("SLURM_NNODES") if os.environ.get("SLURM_JOB_ID") else None
    if nodes is not None and int(nodes) != num_nodes:
        raise ValueError(f"trainer.num_nodes={num_nodes} but the SLURM allocation has {nodes} nodes (SLURM_NNODES); "
                         "set --trainer.num_nodes to match #SBATCH --nodes")
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] if nodes is not None else ""
    if tasks.isdigit() and per_node is not None and int(tasks) != per_node:
        raise ValueError(f"trainer.devices={per_node} but SLURM runs {tasks} tasks per node (SLURM_NTASKS_PER_NODE); "
                         "set --trainer.devices to match #SBATCH --ntasks-per-node")


_PROJECT = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                 for d in ("recipes", "lightning_modules", "datamodules", "callbacks"))


def is_user_error(err: BaseException) -> bool:
    """A bad value the user gave (one line, exit 2), not a bug of ours (traceback kept): the config parser's and
    Lightning's configuration errors, and exceptions our code raises on purpose -- the innermost frame is a ``raise``
    statement in this project (also through the exception's cause / context chain).  A ``KeyError`` from a lookup, a ``TypeError`` from a wrong call, a ``ValueError``
    deep in a library: bugs, shown with their traceback."""
    import traceback

    seen = set()
    while err is not None and id(err) not in seen:  # the config parser re-raises what a class's __init__ raised
        seen.add(id(err))
        if isinstance(err, (ArgumentError, MisconfigurationException, NonFiniteLossError)):
            return True
        frames = traceback.extract_tb(err.__traceback__)
        if frames and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename:
            return True  # the parser's verdict on a value (it reports what a class's __init__ raised as text)
        if frames and frames[-1].filename.startswith(_PROJECT) and \
                (frames[-1].line or "").lstrip().startswith("raise "):
            return True
        err = err.__cause__ or err.__context__
    return False


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
    if "Does not validate against any of the Union subtypes" in text:  # a list-valued field (trainer.callbacks)
        causes = [line[4:] for line in str(err).splitlines() if line.startswith("  - ")
                  and not line.startswith(("  - Expected a <class 'NoneType'>", "  - Not a valid subclass"))]
        if causes:
            text = " ".join(causes[0].split())
        else:  # an Optional[...] field given a value of neither type: name the types and the value
            raw = str(err)
            types = [t for t in re.findall(r"- Expected a <class '([\w.]+)'>", raw) if t != "NoneType"]
            given = re.search(r"Given value: (.*)", raw)
            head = text.split(": Does not validate")[0] if ": Does not validate" in text else None
            expected = " or ".join(types + ["null"]) if types else "another value"
            text = (f"{head}: " if head else "") + f"expected {expected}, got {given.group(1).strip()!r}" \
                if given else text
    text = re.sub(r" - Problem with given class_path '[^']+': .*$", "", text)  # the same cause, said again
    text = re.sub(r" - Not a valid subclass of .*$", "", text)  # jsonargparse's list of accepted forms
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("Expected a ", "expected ")
    text = re.sub(r"( - expected [\w.\[\], ]+)+$", "", text)  # the other members of a Union it tried
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def main(args: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["ls"]:  # the recipe catalog, as torchtune's ``tune ls``
        from recipes.catalog import ls

        return ls(argv[1:])
    debug = os.environ.get("RECIPES_DEBUG") == "1"
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # The method callbacks' epoch summaries (fl/*: multipliers identical on every rank; topo/*, samples/*: computed
    # on rank 0) and FoX's evaluation summaries (val|test/loss_<a>_<b>, gates/*: computed from torchmetrics states,
    # already reduced over ranks) need no all-reduce, but Lightning suggests sync_dist=True for every epoch-level
    # value under DDP.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('((fl|topo|samples|gates)/|"
                                              r"(val|test)/loss_\d+_\d+')")
    watch_slurm_signals()
    try:
        RecipeCLI(
            L.LightningModule, L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=RecipeSaveConfig, save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            args=args,
        )
    except Preempted as stop:  # a checkpoint is saved; requeue (SLURM) or say how to resume
        return end_preempted_run(stop)
    except SIGTERMException:  # raised by Lightning itself, outside RecipeCheckpoint's reach
        print("stopped by a preemption signal; resume with --ckpt_path last", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except USER_ERRORS as err:
        if debug or not is_user_error(err):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: launched by torchrun, Lightning leaves the process
    group open, and gloo's threads can then abort a finished rank at exit ("terminate called ...")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
