"""Environment steps per second of the whole off-policy loop (act epsilon-greedily, store, sample, update): our DQN
(``datamodules.replay_data`` + ``layers.off_policy``) against stable-baselines3's DQN on the same MinAtar game with the
same network (SB3 gets our encoder and penultimate head as its features extractor, then the same linear Q layer),
batch 32, replay ratio (one update every 4 steps), warm-up, target period, Adam; run round-robin in this process.
A second table: the cost of one update (online forward and backward, target forward, Adam, batch 32) of each head
as a ratio to flatten x1.

    python scripts/bench_dqn.py [--game Breakout-v1] [--steps 20000] [--reps 3]

stable-baselines3 is a benchmark-only extra (``pip install -e '.[bench]'``).  Results go to docs/performance.md
(section ``dqn_throughput``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import interleaved_times, update_section  # noqa: E402

warnings.filterwarnings("ignore")
HEADS = {"flatten x1": dict(head="flatten", scale=1), "flatten x4": dict(head="flatten", scale=4),
         "SoftMoE-1 x4 PerConv": dict(head="softmoe", experts=1, scale=4),
         "SoftMoE-4 PerConv": dict(head="softmoe", experts=4, scale=1)}
SETTINGS = dict(batch=32, warmup=1000, period=4, target=1000, lr=2.5e-4, eps=3.125e-4, buffer=100_000)


def ours(env_id: str, steps: int, head: dict) -> float:
    import lightning as L

    from datamodules.replay_data import ReplayDataModule
    from lightning_modules.softmoe_dqn import SoftMoEDQN

    s = SETTINGS
    dm = ReplayDataModule(env_id, batch_size=s["batch"], capacity=s["buffer"], warmup_steps=s["warmup"],
                          update_period=s["period"], epsilon_decay_steps=steps // 2, steps_per_epoch=steps, seed=0)
    model = SoftMoEDQN(**head, lr=s["lr"], adam_eps=s["eps"], target_update_period=s["target"], seed=0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - start


def sb3(env_id: str, steps: int, head: dict) -> float:
    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    from datamodules.envs import register_namespaces
    from lightning_modules.layers.q_networks import QNetwork

    class Features(BaseFeaturesExtractor):  # our encoder + penultimate head; SB3 adds the same Linear(-> Q)
        def __init__(self, space):
            probe = QNetwork(space.shape, 1, **head)
            super().__init__(space, probe.head.out_features)
            self.net = probe

        def forward(self, obs):
            return self.net.features(obs)

    register_namespaces(env_id)
    s = SETTINGS
    env = gym.make(env_id)
    model = DQN("MlpPolicy", env, learning_rate=s["lr"], buffer_size=s["buffer"], learning_starts=s["warmup"],
                batch_size=s["batch"], train_freq=s["period"], gradient_steps=1,
                target_update_interval=s["target"] * s["period"], exploration_fraction=0.5,
                exploration_final_eps=0.01, max_grad_norm=1e9, device="cpu", seed=0, verbose=0,
                policy_kwargs=dict(features_extractor_class=Features, net_arch=[],
                                   optimizer_kwargs=dict(eps=s["eps"])))
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - start
    env.close()
    return wall


def update_costs(reps: int) -> Dict[str, float]:
    from lightning_modules.softmoe_dqn import SoftMoEDQN

    gen = torch.Generator().manual_seed(0)
    batch = {"obs": torch.rand(32, 10, 10, 4, generator=gen) > 0.5,
             "next_obs": torch.rand(32, 10, 10, 4, generator=gen) > 0.5,
             "actions": torch.randint(3, (32,), generator=gen), "returns": torch.randn(32, generator=gen),
             "discounts": torch.full((32,), 0.99)}
    fns = {}
    for name, kw in HEADS.items():
        m = SoftMoEDQN(**kw, seed=0)
        m.build((10, 10, 4), 3, "bool")
        opt = torch.optim.Adam(m.online.parameters(), lr=1e-4, foreach=True)

        def step(m=m, opt=opt):
            loss, _, _ = m.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        fns[name] = step
    return interleaved_times(fns, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--game", default="Breakout-v1")
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--heads", nargs="+", default=["flatten x1", "SoftMoE-1 x4 PerConv"], choices=list(HEADS))
    args = ap.parse_args()
    env_id = f"MinAtar/{args.game}"
    rows = []
    for name in args.heads:
        walls: Dict[str, list] = {"ours": [], "sb3": []}
        for _ in range(args.reps):  # round-robin: machine noise hits both sides alike
            walls["ours"].append(ours(env_id, args.steps, HEADS[name]))
            walls["sb3"].append(sb3(env_id, args.steps, HEADS[name]))
        a, b = statistics.median(walls["ours"]), statistics.median(walls["sb3"])
        rows.append((name, a, b))
        print(f"{name}: ours {args.steps / a:.0f} steps/s, SB3 {args.steps / b:.0f} steps/s, ratio {b / a:.2f}",
              flush=True)
    costs = update_costs(reps=200)
    base = costs["flatten x1"]
    s = SETTINGS
    lines = ["## Off-policy loop throughput: ours vs stable-baselines3 DQN; per-update cost of the heads (issue #15)",
             "", f"`python scripts/bench_dqn.py {' '.join(sys.argv[1:])}` (CPU, {torch.get_num_threads()} threads; "
             f"MinAtar {args.game}, one environment, {args.steps:,} environment steps of which {s['warmup']:,} "
             f"random warm-up, one update of batch {s['batch']} every {s['period']} steps, target copied every "
             f"{s['target']:,} updates, Adam {s['lr']} (eps {s['eps']}), replay {s['buffer']:,}; the same network on "
             f"both sides; median of {args.reps} round-robin repetitions in one process).", "",
             "| network | ours env steps/s | SB3 env steps/s | **ours / SB3** |", "|---|---|---|---|"]
    for name, a, b in rows:
        lines.append(f"| {name} | {args.steps / a:.0f} | {args.steps / b:.0f} | **{b / a:.2f}x** |")
    lines += ["", "One update (online forward + backward over the batch, target forward, Adam; double DQN off), "
              "batch 32, MinAtar Breakout shapes, median of 200 interleaved calls:", "",
              "| head | ms per update | ratio to flatten x1 |", "|---|---|---|"]
    for name, t in costs.items():
        lines.append(f"| {name} | {t * 1000:.2f} | {t / base:.2f} |")
    text = "\n".join(lines) + "\n"
    update_section("dqn_throughput", text)
    print(text)


if __name__ == "__main__":
    main()
