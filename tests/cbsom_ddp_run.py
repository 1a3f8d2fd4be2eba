"""Worker for tests/test_cbsom_ddp.py: the tiny CB-SOM recipe's model with N CPU processes (gloo DDP).

    python tests/cbsom_ddp_run.py OUT DEVICES MODE STEPS

Each rank records the BMU it applied at every step and saves it with its final weights to OUT/rank<r>.pt.
"""
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from callbacks.self_organizing_map import SelfOrganizingMap  # noqa: E402
from datamodules.images import DigitsDataModule  # noqa: E402
from lightning_modules.topographic_resnet import TopographicClassifier  # noqa: E402


class RecordingSOM(SelfOrganizingMap):
    """The SOM callback, recording each step's BMU per layer (read where the update uses it)."""

    history = []

    def _bmu(self, trainer, name, channels):
        bmu = super()._bmu(trainer, name, channels)
        self.history.append((trainer.global_step, name, None if bmu is None else int(bmu)))
        return bmu


class SaveReplica(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        som = next(cb for cb in trainer.callbacks if isinstance(cb, RecordingSOM))
        torch.save({"history": som.history, "weights": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                    "step": trainer.global_step}, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(out, devices, mode, steps):
    torch.set_num_threads(1)
    # random BMUs with no explicit seed: each rank's own run seed differs, the callback takes rank 0's (broadcast)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    L.seed_everything(rank if mode == "random" else 0, verbose=False)
    som = RecordingSOM(mode=mode, alpha0=0.1, sigma_min=1.0)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp", max_steps=steps,
                        callbacks=[som, SaveReplica(out)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(TopographicClassifier(preset="tiny", stem="small"), DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
