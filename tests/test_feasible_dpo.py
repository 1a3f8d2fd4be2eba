"""Feasible-Learning DPO: the per-pair DPO loss against a float64 reference, the per-pair dual step of both update
orders through the DPO module, preference data (toy, JSONL, the Orca layout on disk), padding, LoRA's reference, a
short fit, CSERM as a mode of every FL recipe, and one-line errors for bad input."""
import math

import numpy as np
import pytest
import torch

from callbacks.feasible_learning import FeasibleLearning
from datamodules.preference_pairs import PreferenceDataModule, collate_pairs, read_pairs_jsonl, toy_pairs
from lightning_modules.feasible_dpo import FeasibleDPO
from lightning_modules.layers.preference_losses import dpo_pair_losses
from recipes.cli import main
from tests.helpers import RECIPES, run_dir_args, write_tiny_preferences

D = torch.float64


def test_dpo_pair_losses_values_and_gradients_against_float64_reference():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (torch.tensor(rng.normal(-8, 3, 5), dtype=D, requires_grad=True) for _ in range(4))
    beta = 0.1
    got = dpo_pair_losses(pc, pr, rc, rr, beta)
    h = (pc - pr - rc + rr).detach().numpy()
    want = np.log1p(np.exp(-beta * h))  # -log sigmoid(beta h)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-13, atol=0)
    w = torch.tensor(rng.random(5), dtype=D)
    (got * w).sum().backward()
    d = -beta / (1 + np.exp(beta * h)) * w.numpy()  # d/dh of -log sigmoid(beta h) = -beta sigmoid(-beta h)
    for t, sign in ((pc, 1), (pr, -1), (rc, -1), (rr, 1)):
        np.testing.assert_allclose(t.grad.numpy(), sign * d, rtol=1e-12, atol=0)
    ipo = dpo_pair_losses(pc.detach(), pr.detach(), rc.detach(), rr.detach(), beta, kind="ipo")
    np.testing.assert_allclose(ipo.numpy(), (h - 1 / (2 * beta)) ** 2, rtol=1e-13)


def _toy_batch(n=6, seed=3):
    pairs = toy_pairs(n, seed)
    items = [{"index": i, "prompt": p.tolist(), "chosen": c.tolist(), "rejected": r.tolist()}
             for i, (p, c, r) in enumerate(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]))]
    return collate_pairs(items)


def test_toy_pairs_are_a_programmatic_preference_and_deterministic():
    a, b = toy_pairs(300, 0), toy_pairs(300, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["chosen"], toy_pairs(300, 1)["chosen"])
    assert bool((a["gold_chosen"] > a["gold_rejected"]).all())  # no ties, chosen strictly better
    gaps = (a["gold_chosen"] - a["gold_rejected"]) * 8
    assert int((gaps == 1).sum()) > 20 and int((gaps >= 5).sum()) > 20  # hard and easy pairs both present


@pytest.mark.parametrize("order", ["dual_first", "simultaneous"])
def test_per_pair_dual_step_and_primal_gradient_through_the_dpo_module(order):
    """The authors' DPO settings (lambda init 1, dual lr 1, alpha 1, mean): the step's multipliers and the gradient
    of the returned loss against a hand computation from the module's own per-pair losses."""
    torch.manual_seed(0)
    model = FeasibleDPO(policy={"kind": "tiny", "vocab_size": 8, "embed": 8, "hidden": 8}).double()
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the reference, so the losses differ from log 2
    batch = _toy_batch()
    batch["index"] = torch.tensor([7, 2, 9, 0, 4, 5])
    eps, alpha = 0.3, 1.0
    fl = FeasibleLearning(epsilon=eps, dual_lr=1.0, resilient_alpha=alpha, init=1.0, reduction="mean",
                          update_order=order)
    lam0 = torch.linspace(0.0, 2.0, 10, dtype=torch.float32)
    fl.lam = lam0.clone()
    model.set_sample_loss_reducer(fl.primal_loss)
    losses = model.sample_losses(batch)["loss"]
    model.zero_grad()
    model.reduce_sample_losses(losses, batch["index"]).backward()
    got = [p.grad.clone() for p in model.policy.parameters()]

    idx = batch["index"]
    old = lam0[idx].double()
    new = (old + 1.0 * (losses.detach() - eps - old / alpha)).clamp_min(0.0)
    torch.testing.assert_close(fl.lam[idx].double(), new, rtol=0, atol=1e-6)  # lambda is float32
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(fl.lam[untouched], lam0[untouched])
    weights = old if order == "simultaneous" else fl.lam[idx].double()
    model.zero_grad()
    (weights * model.sample_losses(batch)["loss"]).mean().backward()
    for g, p in zip(got, model.policy.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(old, fl.lam[idx].double())  # the two orders really differ here


def test_dpo_module_starts_at_log2_and_padding_does_not_change_a_pair(tmp_path):
    root = write_tiny_preferences(tmp_path)
    dm = PreferenceDataModule(source="jsonl", train_path=str(root / "train.jsonl"), val_path=str(root / "val.jsonl"),
                              tokenizer=str(root / "tokenizer"), batch_size=4)
    dm.setup()
    model = FeasibleDPO(policy={"kind": "hf", "path": str(root / "policy")}).eval()
    items = [dm.train_set[i] for i in range(6)]
    with torch.no_grad():
        out = model.sample_losses(collate_pairs(items, dm.pad_id))
        torch.testing.assert_close(out["loss"], torch.full((6,), math.log(2.0)))  # policy == reference at start
        torch.nn.init.normal_(model.policy.lm_head.weight, std=0.5)  # policy moves away, the reference stays
        together = model.sample_losses(collate_pairs(items, dm.pad_id))["loss"]
        alone = torch.cat([model.sample_losses(collate_pairs([it], dm.pad_id))["loss"] for it in items])
    assert not torch.allclose(together, torch.full((6,), math.log(2.0)))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_lora_policy_uses_its_adapter_free_self_as_reference(tmp_path):
    root = write_tiny_preferences(tmp_path)
    dm = PreferenceDataModule(source="hf_disk", train_path=str(root / "orca"), tokenizer=str(root / "tokenizer"))
    dm.setup()
    model = FeasibleDPO(policy={"kind": "hf", "path": str(root / "policy")}, lora={"r": 4, "alpha": 8,
                                                                                  "dropout": 0.0})
    assert model.ref is None
    trainable = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = collate_pairs([dm.train_set[i] for i in range(4)], dm.pad_id)
    with torch.no_grad():
        for n, p in model.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
        out = model.sample_losses(batch)
        model_ref, ctx = model._reference()
        with ctx:
            ref = model._seq_logprobs(model_ref, batch)
    assert not torch.allclose(out["loss"], torch.full((4,), math.log(2.0)))
    base = FeasibleDPO(policy={"kind": "hf", "path": str(root / "policy")})
    with torch.no_grad():
        torch.testing.assert_close(ref, base._seq_logprobs(base.ref, batch))  # adapters off = the base model


def test_jsonl_and_orca_layout_read_filter_split_and_chat_template(tmp_path):
    root = write_tiny_preferences(tmp_path, n=40)
    rows = read_pairs_jsonl(str(root / "train.jsonl"))
    assert len(rows) == 30 and {"prompt", "chosen", "rejected", "system"} <= set(rows[0])
    dm = PreferenceDataModule(source="hf_disk", train_path=str(root / "orca"), tokenizer=str(root / "tokenizer"),
                              val_fraction=0.25)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 32  # 8 of 40 rows are ties, low scores or GSM8K questions
    assert len(dm.val_set) == 8  # the first quarter, unshuffled
    eos = dm.eos_id
    item = dm.train_set[0]
    assert item["chosen"][-1] == eos and item["rejected"][-1] == eos
    from datamodules.preference_pairs import encode_pairs
    from datamodules.text_tokenizers import HFTokenizer

    row = {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4 w5", "system": "w6"}
    for folder, text, bos in (("tokenizer_chat", "system : w6 user : w1 w2 assistant : ", [eos]),
                              ("tokenizer", "w6\n\nw1 w2\n\n", [])):  # the chat tokenizer's BOS is [EOS]
        tok = HFTokenizer(str(root / folder))
        got = encode_pairs([row], tok, max_prompt_tokens=1024, max_response_tokens=2)[0]
        assert got["prompt"] == bos + tok.encode(text), folder
        assert got["chosen"] == tok.encode("w3") + [eos] and got["rejected"] == tok.encode("w4 w5")  # cut at 2
    tok = HFTokenizer(str(root / "tokenizer_chat"))
    tok.tok.chat_template = "[EOS] " + tok.tok.chat_template  # a template that starts with BOS (as Llama-3's)
    got = encode_pairs([row], tok, max_prompt_tokens=1024)[0]
    assert got["prompt"] == tok.encode("[EOS] system : w6 user : w1 w2 assistant : ")  # one BOS, not two


def test_truncation_follows_trls_two_stage_rule():
    from datamodules.preference_pairs import truncate_pair

    p, c, r = list(range(10)), list(range(100, 104)), list(range(200, 206))
    assert truncate_pair(p, c, r, 4, 16, 99) == (p, c, r)  # 10 + 6 <= 16: nothing cut, whatever the limits
    assert truncate_pair(p, c, r, 8, 15, 99) == (p[-8:], c, r)  # the prompt first: 8 + 6 <= 15
    assert truncate_pair(p, c, r, 8, 12, 99) == (p[-8:], c, r[:4])  # still too long: responses keep 12 - 8
    assert truncate_pair(p, c, r, 8, None, 5) == (p[-8:], c, r[:5])  # no max_length: each part to its own limit


def test_short_fit_learns_the_toy_preference(tmp_path):
    code = main(["fit", "--config", "recipes/dpo_toy.yaml", "--trainer.max_epochs=2",
                 "--trainer.check_val_every_n_epoch=2", "--data.init_args.n_val=512",
                 "--trainer.enable_progress_bar=false", *run_dir_args(tmp_path)])
    assert code == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "sample_metrics.csv")))
    assert float(rows[-1]["val_acc"]) > 0.62  # from 0.5 at the start (policy == reference: no pair ranked)
    assert float(rows[-1]["train_mean"]) < math.log(2.0) - 0.02


def _fl_recipes():
    return [r for r in RECIPES if "callbacks.feasible_learning.FeasibleLearning" in r.read_text()]


def test_cserm_is_a_mode_of_every_feasible_learning_recipe(capsys):
    recipes = _fl_recipes()
    assert {r.stem for r in recipes} >= {"feasible_digits", "rfl_digits", "feasible_cifar10", "feasible_utkface",
                                         "feasible_dpo_toy", "rfl_dpo_toy", "feasible_dpo_orca"}
    for recipe in recipes:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(recipe), "--trainer.callbacks.init_args.mode=cserm", "--print_config"])
        out = capsys.readouterr().out
        block = out.split("callbacks.feasible_learning.FeasibleLearning", 1)[1].split("class_path", 1)[0]
        assert "mode: cserm" in block, recipe.stem


@pytest.mark.parametrize("args, needle", [
    (["--data.init_args.source=csv"], "data.source='csv'; expected one of toy, jsonl, hf_disk"),
    (["--data.init_args.source=jsonl", "--data.init_args.train_path=x.jsonl"], "data.source=jsonl needs data.val_path"),
    (["--data.init_args.source=hf_disk", "--data.init_args.train_path=/no/such", "--data.init_args.tokenizer=/no/tok"],
     "tokenizer folder '/no/tok' does not exist"),
    (["--model.init_args.beta=0"], "model.beta must be > 0, got 0"),
    (["--model.init_args.schedule=linear"], "model.schedule='linear'; expected one of constant, cosine"),
    (["--model.init_args.lora={r: 8}"], "model.lora needs a Hugging Face policy"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, needle):
    assert main(["fit", "--config", "recipes/dpo_toy.yaml", *args, *run_dir_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last, err[-600:]
    assert "Traceback" not in err


def test_a_pair_without_rejected_is_one_error_naming_it(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: pair 2 has no 'rejected' string"):
        read_pairs_jsonl(str(path))


@pytest.mark.slow
def test_fl_dpo_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    """The per-pair multipliers are training state: a run SIGKILLed mid-epoch and resumed from its last checkpoint ends
    with the multipliers, weights and optimizer state of an uninterrupted run (torchtune's resume test)."""
    from tests.helpers import kill_and_resume

    common = ["fit", "--config", "recipes/feasible_dpo_toy.yaml", "--trainer.max_steps=40",
              "--checkpoint.every_n_train_steps=12", "--trainer.enable_progress_bar=false",
              "--data.init_args.n_train=512", "--data.init_args.n_val=64", "--trainer.check_val_every_n_epoch=100"]
    fl = ("    - class_path: callbacks.feasible_learning.FeasibleLearning\n      init_args:\n        epsilon: 0.3\n"
          "        dual_lr: 1.0\n        init: 1.0\n        reduction: mean\n        update_order: simultaneous\n")
    a, b = kill_and_resume(tmp_path, common, fl, kill_at=30, saved_step=24)  # 8 steps per epoch: mid-epoch 3
    assert a["global_step"] == b["global_step"] == 40
    lam_a, lam_b = (next(v for k, v in ck["callbacks"].items() if k.startswith("FeasibleLearning"))["lam"]
                    for ck in (a, b))
    assert not torch.equal(lam_a, torch.ones_like(lam_a))  # the multipliers moved
    assert torch.equal(lam_a, lam_b)
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    for i, state in a["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(b["optimizer_states"][0]["state"][i]["exp_avg"], state["exp_avg"], rtol=0, atol=0)
