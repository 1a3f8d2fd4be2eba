"""Random weights, learned biases: the frozen-random layers against float64 references, what is trained and what is
not, bias-set routing and isolation, checkpoints that hold only the biases, the data tasks, and one-line errors."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from datamodules.bias_tasks import DIGIT_TASKS, DigitsTasksDataModule, MNISTFamilyDataModule, digit_task
from lightning_modules.bias_learning import BiasLearningMLP, BiasLearningRNN, CrossTaskAccuracy
from lightning_modules.layers.frozen_random import LeakyRandomRNN, RandomLinear, UnitMask, random_weight
from recipes.cli import main
from tests.helpers import MNIST_TASKS, ROOT, last_checkpoint, run_dir_args, write_mnist_family

TASKS = ["a", "b", "c"]


def test_random_linear_matches_a_float64_reference_in_values_and_gradients():
    layer = RandomLinear(5, 7, "uniform", 1.0, seed=3, tasks=TASKS, bias_init="uniform").double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = random_weight(7, 5, "uniform", 1.0, 3).double()  # the layer keeps the float32 draw
    for task in TASKS:
        ref_x = x.detach().clone().requires_grad_(True)
        ref_b = layer.biases[task].detach().clone().requires_grad_(True)
        out, ref = layer(x, task), ref_x @ w.T + ref_b
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        g = torch.randn_like(out)
        gx, gb = torch.autograd.grad(out, (x, layer.biases[task]), g)
        rx, rb = torch.autograd.grad(ref, (ref_x, ref_b), g)
        torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
        torch.testing.assert_close(gb, rb, rtol=0, atol=1e-12)
    assert (w.abs() <= 1.0).all() and w.abs().max() > 0.9  # the U[-R, R] box


def test_weight_distributions_have_the_named_scale():
    u = random_weight(512, 256, "uniform", 0.5, 0)
    n = random_weight(512, 256, "normal", 1.5, 0)
    assert u.min() >= -0.5 and u.max() <= 0.5 and abs(float(u.var()) - 0.25 / 3) < 0.005
    assert abs(float(n.var()) - 1.5 ** 2 / 256) < 0.0005  # N(0, g^2 / fan_in)
    assert torch.equal(random_weight(8, 4, "normal", 1.0, 5), random_weight(8, 4, "normal", 1.0, 5))
    assert not torch.equal(random_weight(8, 4, "normal", 1.0, 5), random_weight(8, 4, "normal", 1.0, 6))


def test_seeded_weights_are_the_same_in_another_process():
    code = ("from lightning_modules.layers.frozen_random import random_weight; "
            "w = random_weight(300, 64, 'uniform', 1.0, 11); print(repr(float(w.double().sum())), w[0, :3].tolist())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    w = random_weight(300, 64, "uniform", 1.0, 11)
    assert proc.stdout.strip() == f"{float(w.double().sum())!r} {w[0, :3].tolist()}"


def _batch(n=32, d=64, tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n) % tasks


def test_frozen_weights_never_change_get_no_gradient_and_the_optimizer_sees_only_biases():
    model = BiasLearningMLP(width=128, tasks=TASKS, seed=1)
    weights = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight")}
    assert set(weights) == {"hidden.weight", "readout.weight"}
    (opt,) = [model.configure_optimizers()]
    params = [p for group in opt.param_groups for p in group["params"]]
    assert sum(p.numel() for p in params) == model.trainable_parameters == 3 * (128 + 10)
    assert all(n.split(".")[1] == "biases" for n, p in model.named_parameters())
    for _ in range(3):
        x, y, task = _batch()
        loss = model.training_step((x, y, task), 0)
        opt.zero_grad()
        loss.backward()
        assert model.hidden.weight.grad is None and not model.hidden.weight.requires_grad
        opt.step()
    for n, b in model.named_buffers():
        if n in weights:
            assert torch.equal(b, weights[n]), n
    full = BiasLearningMLP(width=128, tasks=TASKS, seed=1, train_weights=True)
    assert full.trainable_parameters == 128 * 64 + 10 * 128 + 3 * (128 + 10)
    torch.testing.assert_close(full.hidden.weight.detach(), weights["hidden.weight"], rtol=0, atol=0)  # same draw


def test_each_sample_goes_through_its_own_tasks_biases():
    model = BiasLearningMLP(width=64, tasks=TASKS, seed=2)
    with torch.no_grad():
        for k, name in enumerate(TASKS):
            model.hidden.biases[name].uniform_(-1, 1)
            model.readout.biases[name].fill_(float(k))
    x, _, task = _batch(9)
    mixed = model.logits_by_task(x, task)
    for i in range(9):
        torch.testing.assert_close(mixed[i], model(x[i:i + 1], TASKS[int(task[i])])[0], rtol=0, atol=1e-6)
    w1, w2 = model.hidden.weight.double(), model.readout.weight.double()
    name = TASKS[1]
    b1, b2 = model.hidden.biases[name].double(), model.readout.biases[name].double()
    ref = torch.relu(x.double() @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(model(x, name).double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="unknown task 'd'"):
        model(x, "d")


def test_mixed_task_batches_run_under_bf16_autocast():
    """bf16-mixed (the GPU check's precision): each task's logits come out of autocast in bf16 and are written into
    the batch's float32 output (index_put needs one dtype); the loss is float32 and reaches the biases."""
    model = BiasLearningMLP(width=64, tasks=TASKS, seed=2)
    x, y, task = _batch(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits_by_task(x, task)
        loss = model.training_step((x, y, task), 0)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert all(model.hidden.biases[name].grad is not None for name in TASKS)


def test_training_one_task_leaves_every_other_tasks_biases_bit_identical():
    model = BiasLearningMLP(width=64, tasks=TASKS, seed=3)
    opt = model.configure_optimizers()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(5):
        x, y, _ = _batch(seed=step)
        x, y, task = x, y, torch.full((32,), 1)  # task "b" only, with Adam's momentum carrying over
        opt.zero_grad()
        model.training_step((x, y, task), step).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n.endswith(".b"):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]) and p.grad is None, n


def test_unit_mask_is_a_sigmoid_gate_in_training_and_a_hard_step_in_eval_float64():
    mask = UnitMask(6, TASKS, score_init=0.0).double()
    with torch.no_grad():
        mask.scores["b"].copy_(torch.tensor([-2.0, -0.1, 0.0, 0.05, 0.3, 4.0]))
        mask.steepness.fill_(7.5)
    h = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    s = mask.scores["b"]
    ref_h, ref_s = h.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    out, ref = mask(h, "b"), ref_h * (1 / (1 + torch.exp(-7.5 * ref_s)))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (h, s), g), torch.autograd.grad(ref, (ref_h, ref_s), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    mask.eval()
    assert torch.equal(mask(h, "b"), h * torch.tensor([0.0, 0, 0, 1, 1, 1], dtype=torch.float64))
    assert torch.equal(mask(h, "a"), torch.zeros_like(h))  # score 0 is off
    with pytest.raises(KeyError, match="unknown task 'z'"):
        mask(h, "z")


def test_mask_learning_trains_only_scores_and_output_biases_with_the_steepness_annealed(tmp_path):
    import lightning as L

    from datamodules.bias_tasks import DigitsTasksDataModule

    model = BiasLearningMLP(width=64, tasks=["identity", "invert"], seed=4, learn="masks", steepness_start=2.0,
                            steepness_end=50.0)
    bias_model = BiasLearningMLP(width=64, tasks=["identity", "invert"], seed=4)
    assert torch.equal(model.hidden.weight, bias_model.hidden.weight)  # the same frozen network
    assert sorted(n for n, _ in model.named_parameters()) == [
        "mask.scores.identity", "mask.scores.invert", "readout.biases.identity", "readout.biases.invert"]
    assert model.trainable_parameters == bias_model.trainable_parameters == 2 * (64 + 10)
    fixed = model.hidden.fixed_bias.clone()
    assert fixed.abs().max() <= 1.0 and fixed.std() > 0.3 and "hidden.fixed_bias" not in model.state_dict()

    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            seen.append(float(module.mask.steepness))

    trainer = L.Trainer(max_steps=9, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        default_root_dir=tmp_path)
    trainer.fit(model, DigitsTasksDataModule(batch_size=256))
    # geometric from 2 to 50 over the planned steps (max_steps=9): step k has 2 * 25^(k/8)
    torch.testing.assert_close(torch.tensor(seen), 2.0 * 25.0 ** (torch.arange(9) / 8.0), rtol=1e-6, atol=0)
    assert torch.equal(model.hidden.fixed_bias, fixed)
    model.eval()
    x = torch.rand(5, 64)
    on = (model.mask.scores["invert"] > 0).float()
    ref = torch.relu(x @ model.hidden.weight.T + fixed) * on @ model.readout.weight.T + model.readout.biases["invert"]
    torch.testing.assert_close(model(x, "invert"), ref)
    assert model.units_on("invert") == float(on.mean()) and bias_model.units_on("invert") == 1.0


def test_cross_task_accuracy_counts():
    metric = CrossTaskAccuracy(2)
    preds = torch.tensor([[1, 2, 3, 4], [1, 0, 3, 0]])  # bias set 0 and 1 on four samples
    metric.update(preds, torch.tensor([1, 2, 0, 0]), torch.tensor([0, 0, 1, 1]))
    out = metric.matrices()
    torch.testing.assert_close(out["accuracy"], torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    # task 0's own set is 0: set 1 changes sample 1; task 1's own set is 1: set 0 changes sample 3
    torch.testing.assert_close(out["changed"], torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64))
    one = CrossTaskAccuracy(1)
    one.update(torch.tensor([[1, 1]]), torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert one.matrices()["accuracy"].shape == (1, 1)


def test_leaky_rnn_matches_a_float64_reference_loop():
    rnn = LeakyRandomRNN(16, gain=1.5, dt=0.1, seed=4, inputs=2).double()
    with torch.no_grad():
        rnn.initial_state.uniform_(-0.5, 0.5)
        rnn.recurrent.biases["default"].uniform_(-0.5, 0.5)
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    states = rnn(6, x)
    w = random_weight(16, 16, "normal", 1.5, 4).double()
    b_in = random_weight(16, 2, "normal", 1.0, 6).double()
    r = rnn.initial_state.detach().expand(3, -1)
    for t in range(6):
        r = 0.9 * r + 0.1 * torch.tanh(r @ w.T + x[:, t] @ b_in.T + rnn.recurrent.biases["default"].detach())
        torch.testing.assert_close(states[:, t], r, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(states.square().sum(), (rnn.initial_state, rnn.recurrent.biases["default"]))
    assert all(g.abs().sum() > 0 for g in grads)
    model = BiasLearningRNN(width=32, gain=1.5, seed=0)
    assert model.rnn.recurrent.weight.requires_grad is False and model.readout.weight.requires_grad is False
    assert {n for n, _ in model.named_parameters()} == {"rnn.recurrent.biases.default", "rnn.initial_state"}


def test_a_wide_bias_only_checkpoint_is_small_and_reloads_identically(tmp_path):
    args = ["fit", "--config", "recipes/bias_only_digits.yaml", "--trainer.max_steps=2",
            "--checkpoint.every_n_train_steps=2", "--trainer.enable_progress_bar=false", *run_dir_args(tmp_path)]
    assert main(args) == 0
    ckpt = tmp_path / "checkpoints" / "step0000002.ckpt"
    frozen_bytes = (4096 * 64 + 10 * 4096) * 4
    assert ckpt.stat().st_size < frozen_bytes / 4, ckpt.stat().st_size  # biases + Adam state, no weights
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {"hidden.biases.identity", "readout.biases.identity"}
    a = BiasLearningMLP.load_from_checkpoint(ckpt, map_location="cpu")
    b = BiasLearningMLP.load_from_checkpoint(ckpt, map_location="cpu")
    x = torch.rand(16, 64)
    assert torch.equal(a(x), b(x)) and not torch.equal(state["hidden.biases.identity"], torch.zeros(4096))


def test_digit_tasks_and_the_split():
    dm = DigitsTasksDataModule(tasks=list(DIGIT_TASKS))
    dm.setup()
    assert len(dm.train_set) == 5 * 1347 and len(dm.test_set) == 5 * 450 and dm.in_features == 64
    x, y, t = dm.test_set.tensors
    ident, trans = x[t == 0].view(-1, 8, 8), x[t == 1].view(-1, 8, 8)
    assert torch.equal(trans, ident.transpose(1, 2)) and torch.equal(x[t == 2], 1 - x[t == 0])
    assert torch.equal(y[t == 3], (3 * y[t == 0] + 1) % 10) and torch.equal(x[t == 4].view(-1, 8, 8), ident.flip(1))
    with pytest.raises(ValueError, match="unknown digits task 'rotate'"):
        digit_task("rotate", np.zeros((1, 8, 8)), np.zeros(1))


def test_mnist_family_reads_torchvisions_files_one_task_per_dataset(tmp_path):
    write_mnist_family(tmp_path, MNIST_TASKS)
    dm = MNISTFamilyDataModule(str(tmp_path), tasks=list(MNIST_TASKS), max_train_per_task=30)
    dm.setup()
    assert len(dm.train_set) == 7 * 30 and len(dm.test_set) == 7 * 20 and dm.in_features == 784
    x, y, t = dm.train_set.tensors
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and torch.equal(t.unique(), torch.arange(7))
    assert int(y[t == MNIST_TASKS.index("emnist_letters")].min()) >= 0 and int(y.max()) <= 25  # letters 1..26 -> 0..25
    (tmp_path / "empty").mkdir()
    missing = MNISTFamilyDataModule(str(tmp_path / "empty"), tasks=["qmnist"])
    with pytest.raises(FileNotFoundError, match="task 'qmnist': no QMNIST files under"):
        missing.setup()


@pytest.mark.parametrize("extra, needle", [
    (["--data.init_args.tasks=[identity, rotate]"], "unknown digits task 'rotate'"),
    (["--model.init_args.width=0"], "model.width must be >= 1, got 0"),
    (["--model.init_args.distribution=cauchy"], "model.distribution"),
    (["--data.init_args.tasks=[identity, vflip]"], "data tasks ['identity', 'vflip'] differ from model.tasks"),
    (["--model.init_args.learn=weights"], "model.learn='weights'; expected one of biases, masks"),
    (["--model.init_args.learn=masks", "--model.init_args.train_weights=true"], "cannot be combined"),
    (["--model.init_args.steepness_start=0"], "model.steepness_start=0.0"),
])
def test_bad_input_is_one_line(extra, needle, tmp_path, capsys):
    code = main(["fit", "--config", "recipes/bias_only_digits.yaml", "--trainer.max_steps=1", *extra,
                 *run_dir_args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], err[-3:]


def test_a_negative_gain_is_one_line(tmp_path, capsys):
    code = main(["fit", "--config", "recipes/bias_rnn_vanderpol.yaml", "--model.init_args.gain=-1",
                 *run_dir_args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == "error: ValueError: model.gain must be >= 0, got -1.0", err[-3:]
    assert math.isfinite(float(BiasLearningRNN(width=8, gain=0.0)(5).sum()))  # gain 0: no recurrence, valid


MULTI = ["fit", "--config", "recipes/bias_multitask_digits.yaml", "--model.init_args.width=256",
         "--trainer.max_steps=12", "--checkpoint.every_n_train_steps=5", "--trainer.check_val_every_n_epoch=null",
         "--trainer.val_check_interval=6", "--trainer.enable_progress_bar=false"]


def test_a_killed_multitask_run_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path):
    """27 steps per epoch: the kill after step 7 and the resume from step 5 are mid-epoch."""
    from tests.helpers import run_cli

    straight = run_cli([*MULTI, *run_dir_args(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-2000:]
    killer = tmp_path / "kill.yaml"
    killer.write_text("trainer:\n  callbacks:\n    - class_path: tests.helpers.KillAfterStep\n      init_args:\n"
                      "        step: 7\n")
    crashed = run_cli([*MULTI, "--config", str(killer), *run_dir_args(tmp_path / "resumed")])
    assert crashed.returncode == -9 and last_checkpoint(tmp_path / "resumed")["global_step"] == 5
    resumed = run_cli([*MULTI, *run_dir_args(tmp_path / "resumed"), "--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 12 and set(a["state_dict"]) == set(b["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_the_same_global_batches(tmp_path):
    """Tasks a rank's batch lacks get no gradient there: DDP needs find_unused_parameters (documented)."""
    from tests.helpers import run_cli

    def fit(name, devices, batch):
        strategy = "ddp_find_unused_parameters_true" if devices > 1 else "auto"
        proc = run_cli([*MULTI, "--trainer.max_steps=6", f"--data.init_args.batch_size={batch}",
                        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", f"--trainer.strategy={strategy}",
                        *run_dir_args(tmp_path / name)], env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return last_checkpoint(tmp_path / name)

    ddp, one = fit("ddp", 2, 64), fit("one", 1, 128)
    assert ddp["global_step"] == one["global_step"] == 6
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=2e-5, msg=key)
