"""The shipped CB-SOM recipes hold the paper's settings (spec shared/specs/cbsom.md 1.7-1.8), checked on the objects
the CLI builds from them, not on the YAML text."""
import math

import pytest
import torch
from torch import nn

from recipes.cli import RecipeCLI
from tests.helpers import write_cifar, write_image_folder


def build(args):
    import lightning as L

    return RecipeCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     run=False, args=args, parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False})


@pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
@pytest.mark.parametrize("recipe", ["cbsom_imagenet", "cbsom_cifar10"])
def test_paper_optimisation_and_som_settings(recipe, tmp_path):
    if recipe == "cbsom_imagenet":
        data = [f"--data.init_args.path={write_image_folder(tmp_path / 'in')}"]
    else:
        write_cifar(tmp_path / "c")
        data = [f"--data.init_args.path={tmp_path / 'c'}"]
    cli = build(["--config", f"recipes/{recipe}.yaml", f"--trainer.default_root_dir={tmp_path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", *data])
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.max_epochs == 90 and dm.hparams.batch_size == (256 if recipe == "cbsom_imagenet" else 128)
    model._build(dm.num_classes, dm.in_channels)
    opt = model.configure_optimizers()
    sgd, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 0.0)
    assert sorted(sched.milestones) == [60, 80] and sched.gamma == 0.1 and opt["lr_scheduler"]["interval"] == "epoch"
    widths = sorted({m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)})
    assert widths == [64, 144, 256, 529] and all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))

    som = next(cb for cb in trainer.callbacks if type(cb).__name__ == "SelfOrganizingMap")
    som.on_fit_start(trainer, model)
    assert som.mode == "cb" and len(som.targets) == 20  # every conv, downsample 1x1s included (bug B1)
    for name, conv in som.targets.items():
        sched_ = som.schedules[name]
        assert sched_.alpha0 == (0.01 if name.startswith("model.stages.3") else 0.008), name
        assert sched_.sigma0 == math.isqrt(conv.out_channels)
        assert (sched_.decay, sched_.alpha_min, sched_.sigma_min) == (-3.0, 0.003, 0.003)
    som.teardown(trainer, model, "fit")
