"""Asynchronous RLHF through Lightning: each update's batch carries the policy version the schedule says, a short
Online DPO fit raises the gold reward and writes its report, a resumed asynchronous run equals an uninterrupted one
(batches in flight at the checkpoint included), the proxy reward model, Hugging Face folders (JSONL and TL;DR-layout
prompts, PPO's critic on a GPT-2), and bad input as one line."""
import csv

import lightning as L
import pytest
import torch

from datamodules.rlhf_data import RLHFDataModule
from lightning_modules.online_dpo import OnlineRLHF
from recipes.cli import main
from tests.helpers import one_line_error, run_dir_args, write_tiny_rlhf


def _fit(module, data, steps, **trainer):
    L.seed_everything(0)
    t = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, **trainer)
    t.fit(module, data)
    return t


def test_every_update_trains_on_the_version_the_schedule_gives():
    """The paper's N = 3 (synchronous): updates 0-2 from theta_0, 3-5 from theta_3; the asynchronous lag is checked
    by the staleness column of the next test."""
    module = OnlineRLHF(response_length=4)
    data = RLHFDataModule(batch_size=4, sync=True, num_mini_batches=3, steps_per_epoch=4, eval_prompts=0)
    _fit(module, data, 7)
    assert module.batch_versions == [(t, 3 * (t // 3)) for t in range(7)]
    assert data.actor is None  # the actor process ended with the run


def _read(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_short_online_dpo_fit_raises_the_gold_reward_and_writes_the_report(tmp_path):
    code = main(["fit", "--config", "recipes/online_dpo_toy_async.yaml", *run_dir_args(tmp_path),
                 "--trainer.max_steps=100", "--data.init_args.steps_per_epoch=50", "--data.init_args.eval_prompts=128",
                 "--trainer.enable_progress_bar=false"])
    assert code == 0
    run = tmp_path / "logs" / "version_0"
    for name in ("rlhf_eval.csv", "reward_kl.png", "training.csv", "timing.csv", "samples.csv"):
        assert (run / name).exists(), name
    evals = _read(run / "rlhf_eval.csv")
    assert [int(r["step"]) for r in evals] == [50, 100]
    assert float(evals[-1]["gold"]) > 0.2 and float(evals[-1]["win_rate"]) > 0.6  # uniform: 0.125, 0.5
    train = _read(run / "training.csv")
    assert [float(r["staleness"]) for r in train[1:]] == [1.0] * 99 and float(train[0]["staleness"]) == 0.0
    timing = _read(run / "timing.csv")[0]
    assert 0.0 <= float(timing["learner_idle"]) <= 1.0 and 0.0 <= float(timing["actor_idle"]) <= 1.0


@pytest.mark.parametrize("recipe,extra", [("online_dpo_toy_async", []),
                                          ("ppo_toy", ["--data.init_args.sync=false", "--data.init_args.staleness=2"])])
def test_resume_equals_uninterrupted(recipe, extra, tmp_path):
    common = ["--config", f"recipes/{recipe}.yaml", "--data.init_args.batch_size=8",
              "--data.init_args.eval_prompts=0", "--checkpoint.every_n_train_steps=3", "--checkpoint.save_top_k=-1",
              "--trainer.enable_progress_bar=false", "--model.init_args.response_length=5", *extra]
    assert main(["fit", *common, *run_dir_args(tmp_path / "a"), "--trainer.max_steps=6"]) == 0
    mid = tmp_path / "a" / "checkpoints" / "step0000003.ckpt"
    pending = torch.load(mid, weights_only=False)["RLHFDataModule"]["ranks"]
    assert len(pending) == 1 and len(pending[0]) == (1 if not extra else 2)  # the batches made from versions older than step 3
    assert main(["fit", *common, *run_dir_args(tmp_path / "b"), "--trainer.max_steps=6", f"--ckpt_path={mid}"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoints" / "step0000006.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "step0000006.ckpt", weights_only=False)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_proxy_reward_model_learns_the_gold_preferences(tmp_path):
    module = OnlineRLHF(reward={"kind": "proxy", "backbone": {"kind": "tiny", "embed": 32, "hidden": 32}},
                        proxy_pairs=256, proxy_steps=80, response_length=8)
    data = RLHFDataModule(batch_size=8, sync=True, steps_per_epoch=2, eval_prompts=32)
    _fit(module, data, 2)
    assert bool(module.proxy_trained) and module.proxy_fit["accuracy"] > 0.7, module.proxy_fit
    assert "proxy" in module.eval_history[-1] and "gold" in module.eval_history[-1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return write_tiny_rlhf(tmp_path_factory.mktemp("rlhf"))


def test_tldr_layout_and_jsonl_prompts_read_alike(tiny_hf):
    T = tiny_hf
    disk = RLHFDataModule(prompts="hf_disk", train_path=str(T / "tldr"), tokenizer=str(T / "tokenizer"))
    jsonl = RLHFDataModule(prompts="jsonl", train_path=str(T / "train.jsonl"), val_path=str(T / "val.jsonl"),
                           tokenizer=str(T / "tokenizer"))
    for dm in (disk, jsonl):
        dm.setup("fit")
    assert disk.train_set.prompts == jsonl.train_set.prompts and len(disk.train_set) == 24
    assert disk.val_set.references == jsonl.val_set.references and disk.val_set.references[0][-1] == disk.eos_id
    (a,), (b,) = disk.eval_batches(), jsonl.eval_batches()
    assert torch.equal(a["prompts"], b["prompts"]) and torch.equal(a["references"], b["references"])
    sampler = disk.sampler()  # 64 prompts a batch over 24: every prompt once per epoch, a new order each epoch
    sampler.batch_size = 4
    epochs = [[i for b in range(e * 6, e * 6 + 6) for i in sampler(b)[2].tolist()] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24)) and epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="no column 'text'"):
        RLHFDataModule(prompts="hf_disk", train_path=str(T / "tldr"), tokenizer=str(T / "tokenizer"),
                       prompt_column="text").setup("fit")


@pytest.mark.parametrize("source,loss", [("jsonl", "ppo")])
def test_hugging_face_folders_end_to_end(source, loss, tiny_hf, tmp_path):
    T = tiny_hf
    data = [f"--data.init_args.train_path={T / 'train.jsonl'}", f"--data.init_args.val_path={T / 'val.jsonl'}"]
    args = ["--config", "recipes/online_dpo_tldr.yaml", *run_dir_args(tmp_path), "--trainer.accelerator=cpu",
            "--trainer.precision=32-true", "--trainer.enable_progress_bar=false", f"--data.init_args.prompts={source}",
            f"--model.init_args.policy.path={T / 'policy'}", f"--data.init_args.tokenizer={T / 'tokenizer'}",
            f"--model.init_args.reward.path={T / 'rm'}", f"--model.init_args.gold.path={T / 'rm'}", *data,
            f"--model.init_args.loss={loss}", "--data.init_args.batch_size=4", "--data.init_args.actor_device=cpu",
            "--data.init_args.eval_batch_size=4", "--model.init_args.response_length=5"]
    assert main(["fit", *args, "--trainer.max_steps=2", "--data.init_args.steps_per_epoch=2"]) == 0
    run = tmp_path / "logs" / "version_0"
    evals = _read(run / "rlhf_eval.csv")
    assert len(evals) == 1 and 0.0 <= float(evals[0]["win_rate"]) <= 1.0  # against the data's reference responses
    assert all(r["prompt"].startswith("w") for r in _read(run / "samples.csv"))  # decoded text
    assert main(["predict", *args, f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]) == 0
    assert len(_read(tmp_path / "logs" / "version_1" / "predictions.csv")) == 6


@pytest.mark.parametrize("extra,needle", [
    (["--data.init_args.staleness=0"], "data.staleness must be >= 1, got 0"),
    (["--model.init_args.k=1"], "model.k=1"),
    (["--model.init_args.beta=0"], "model.beta must be > 0, got 0"),
    (["--model.init_args.policy={kind: hf, path: /no/such/model}"], "'/no/such/model' does not exist"),
    (["--data.init_args.prompts=jsonl", "--data.init_args.train_path=x.jsonl", "--data.init_args.tokenizer=/no/tok"],
     "tokenizer folder '/no/tok' does not exist"),
    (["--model.init_args.loss=dpo"], "model.loss='dpo'"),
])
def test_bad_input_is_one_line(extra, needle, tmp_path, capsys):
    code = main(["fit", "--config", "recipes/online_dpo_toy.yaml", *run_dir_args(tmp_path), *extra])
    assert code == 2
    assert needle in one_line_error(capsys)


@pytest.mark.slow
def test_sigterm_saves_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from tests.helpers import signal_and_resume

    common = ["fit", "--config", "recipes/online_dpo_toy_async.yaml", "--data.init_args.batch_size=8",
              "--data.init_args.eval_prompts=0", "--trainer.max_steps=8", "--trainer.enable_progress_bar=false",
              "--model.init_args.response_length=5"]
    signal_and_resume(tmp_path, common, signal_at=3, callbacks_yaml="    - class_path: callbacks.rlhf_report.RLHFReport\n")


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_the_actor_ends_with_the_run_on_ctrl_c_and_sigterm(sig, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.helpers import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "recipes", "fit", "--config", "recipes/online_dpo_toy_async.yaml",
                             *run_dir_args(tmp_path), "--trainer.max_steps=100000", "--data.init_args.eval_prompts=0",
                             "--trainer.enable_progress_bar=false"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, actor = time.time() + 120, None
    while actor is None and time.time() < deadline and proc.poll() is None:
        kids = psutil.Process(proc.pid).children(recursive=True)  # the actor is forked by the fork server
        actor = next((k for k in kids if "forkserver" in " ".join(k.parent().cmdline())), None)
        time.sleep(0.2)
    assert actor is not None, "no actor process"
    time.sleep(2.0)  # training
    os.killpg(proc.pid, getattr(signal, sig))  # to the whole process group, as Ctrl-C or a scheduler does
    _, err = proc.communicate(timeout=60)
    gone, _ = psutil.wait_procs([actor], timeout=15)
    assert gone, f"the actor outlived the run after {sig}"
    assert "Traceback" not in err, err[-2000:]


@pytest.mark.slow
def test_ddp_ranks_sample_their_own_prompts_and_resume_exactly(tmp_path):
    """Two CPU processes (gloo), each with its own actor: different prompts per rank, the checkpoint holds both ranks'
    batches in flight, and a resumed two-process run equals the uninterrupted one."""
    from tests.helpers import run_cli

    common = ["fit", "--config", "recipes/online_dpo_toy_async.yaml", "--data.init_args.batch_size=8",
              "--data.init_args.eval_prompts=0", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
              "--trainer.devices=2", "--trainer.strategy=ddp", "--checkpoint.every_n_train_steps=2",
              "--checkpoint.save_top_k=-1", "--model.init_args.response_length=5", "--trainer.max_steps=4"]
    env = {"OMP_NUM_THREADS": "1"}
    a = run_cli([*common, *run_dir_args(tmp_path / "a")], env=env)
    assert a.returncode == 0, a.stderr[-3000:]
    mid = tmp_path / "a" / "checkpoints" / "step0000002.ckpt"
    ranks = torch.load(mid, weights_only=False)["RLHFDataModule"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0][0]["prompts"], ranks[1][0]["prompts"])
    b = run_cli([*common, *run_dir_args(tmp_path / "b"), f"--ckpt_path={mid}"], env=env)
    assert b.returncode == 0, b.stderr[-3000:]
    sa = torch.load(tmp_path / "a" / "checkpoints" / "step0000004.ckpt", weights_only=False)["state_dict"]
    sb = torch.load(tmp_path / "b" / "checkpoints" / "step0000004.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
