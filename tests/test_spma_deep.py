"""Deep SPMA and the on-policy loop through Lightning: rollouts collected with the policy they train, a preempted
CartPole run resumed mid-epoch equal to an uninterrupted one, DDP ranks with their own environments, one-line errors."""
import lightning as L
import pytest
import torch

from datamodules.rollouts import RolloutDataModule
from lightning_modules.spma import SPMAAgent
from recipes.cli import main
from tests.helpers import ddp_signal_and_resume, run_dir_args, signal_and_resume

SMALL = ["--data.init_args.num_envs=2", "--data.init_args.n_steps=64", "--data.init_args.rollouts_per_epoch=3",
         "--data.init_args.eval_episodes=2", "--model.init_args.n_epochs=2", "--model.init_args.batch_size=32",
         "--trainer.enable_progress_bar=false"]


def env_states(blob: torch.Tensor):
    """What a CartPole snapshot holds, comparable (pickles of equal generators need not be equal bytes)."""
    import pickle

    import numpy as np

    copies, autoreset = pickle.loads(blob.numpy().tobytes())
    out = [autoreset.tolist()]
    for pickled, extra in copies:
        env = pickle.loads(pickled)
        out.append((extra["np_random"], np.asarray(env.unwrapped.state).tolist(), env._elapsed_steps
                    if hasattr(env, "_elapsed_steps") else env.env._elapsed_steps))
    return out


class RecordRatios(SPMAAgent):
    """Records, for the first minibatch of every rollout, how far log pi is from the rollout's log pi_old."""

    def training_step(self, dataloader_iter):
        self.first = True
        return super().training_step(dataloader_iter)

    def actor_loss(self, mb):
        loss, logp, entropy = super().actor_loss(mb)
        if self.first:
            self.first_gaps = getattr(self, "first_gaps", []) + [float((logp - mb["log_probs"]).abs().max())]
            self.first = False
        return loss, logp, entropy


@pytest.mark.parametrize("env_id", ["CartPole-v1", "InvertedPendulum-v5"])
def test_every_rollout_is_collected_with_the_policy_it_trains(env_id, tmp_path):
    """r = 1 at the first inner step of every rollout (SPMA's KL term is then 0): no stale, prefetched rollout."""
    model = RecordRatios(n_epochs=2, batch_size=32, lr_actor=3e-3)
    dm = RolloutDataModule(env_id, num_envs=2, n_steps=32, rollouts_per_epoch=4, eval_episodes=0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert len(model.first_gaps) == 4 and max(model.first_gaps) < 1e-5, model.first_gaps
    assert trainer.global_step == 4  # one counted step per rollout


def test_the_armijo_option_runs_through_lightning(tmp_path):
    """Armijo on the actor (official constants), Adam on the critic: every search is counted, one step per rollout."""
    model = SPMAAgent(n_epochs=2, batch_size=32, armijo_actor=True)
    dm = RolloutDataModule("CartPole-v1", num_envs=2, n_steps=32, rollouts_per_epoch=3, eval_episodes=0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    search = trainer.optimizers[0].state["search"]
    assert search["searches"] == 3 * 2 * 2 and search["total_trials"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_preempted_cartpole_run_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path):
    """SIGTERM after rollout 4 (the middle of epoch 2): checkpoint, exit 143, resume with --ckpt_path last; policy,
    optimisers, environments, noise and the report's rows end bit-identical."""
    common = ["fit", "--config", "recipes/spma_cartpole.yaml", "--trainer.max_epochs=3", *SMALL]
    a, b = signal_and_resume(tmp_path, common, 5)
    assert a["global_step"] == b["global_step"] == 9 and a["epoch"] == b["epoch"]
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"]):
        for k in sa["state"]:
            assert torch.equal(sa["state"][k]["exp_avg"], sb["state"][k]["exp_avg"])
    da, db = a["RolloutDataModule"]["ranks"][0], b["RolloutDataModule"]["ranks"][0]
    for k in ("obs", "ep_return", "ep_length", "noise", "episodes"):
        assert torch.equal(da[k], db[k]), k
    assert env_states(da["envs"]) == env_states(db["envs"])
    assert da["iteration"] == db["iteration"] == 9
    ra = (tmp_path / "straight" / "logs" / "version_0" / "training.csv").read_text()
    rb = (tmp_path / "resumed" / "logs" / "version_1" / "training.csv").read_text()
    assert ra == rb and len(ra.splitlines()) == 10


@pytest.mark.slow
def test_two_ddp_ranks_step_their_own_environments_and_resume_exactly(tmp_path):
    common = ["fit", "--config", "recipes/spma_cartpole.yaml", "--trainer.max_epochs=2", *SMALL,
              "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    a, b = ddp_signal_and_resume(tmp_path, common, signal_at=4)
    ranks = a["RolloutDataModule"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["obs"], ranks[1]["obs"])
    for ra, rb in zip(ranks, b["RolloutDataModule"]["ranks"]):
        assert torch.equal(ra["obs"], rb["obs"]) and env_states(ra["envs"]) == env_states(rb["envs"])


@pytest.mark.parametrize("recipe, extra, needle", [
    ("spma_cartpole", ["--data.init_args.env_id=NoSuchEnv-v9"], "data.env_id='NoSuchEnv-v9' is not a registered"),
    ("spma_inverted_pendulum", ["--model.init_args.action_head=categorical"],
     "model.action_head=categorical but the environment has continuous actions"),
    ("spma_cartpole", ["--model.init_args.eta=0"], "model.eta must be > 0, got 0"),
    ("spma_cartpole", ["--model.init_args.eta=-1"], "model.eta must be > 0, got -1"),
    ("spma_cartpole", ["--data.init_args.n_steps=0"], "data.n_steps (rollout length) must be >= 1, got 0"),
    ("spma_cartpole", ["--model.init_args.loss=trpo"], "model.loss='trpo'"),
])
def test_bad_input_is_one_line(recipe, extra, needle, tmp_path, capsys):
    code = main(["fit", "--config", f"recipes/{recipe}.yaml", "--trainer.max_epochs=1", *extra,
                 *run_dir_args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], err[-3:]
