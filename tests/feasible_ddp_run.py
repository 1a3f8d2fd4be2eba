"""Worker for tests/test_feasible_ddp.py: Feasible Learning on digits with N CPU processes (gloo DDP) or one.

    python tests/feasible_ddp_run.py OUT DEVICES LOCAL_BATCH STEPS

Each rank saves its lambda replica and the final weights to OUT/rank<r>.pt.
"""
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from callbacks.feasible_learning import FeasibleLearning  # noqa: E402
from datamodules.images import DigitsDataModule  # noqa: E402
from lightning_modules.feasible_classifier import FeasibleClassifier  # noqa: E402


class SaveReplica(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        fl = next(cb for cb in trainer.callbacks if isinstance(cb, FeasibleLearning))
        torch.save({"lam": fl.lam.cpu(), "weights": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                    "step": trainer.global_step}, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(out, devices, local_batch, steps):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=local_batch, standardize=True, with_index=True)
    model = FeasibleClassifier(backbone="linear", optimizer="sgd", lr=0.02, momentum=0.9)
    fl = FeasibleLearning(target_probability=0.6, dual_lr=0.1, resilient_alpha=5.0)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=steps, callbacks=[fl, SaveReplica(out)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(model, dm)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
