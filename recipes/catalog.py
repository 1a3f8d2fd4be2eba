"""The recipe catalog behind ``python -m recipes ls``: every shipped recipe with its method, its paper, what its run
shows and whether it is sized for a CPU or for a GPU.

``python -m recipes ls`` prints a table, ``python -m recipes ls --json`` a list of records for scripts (the GPU check,
``scripts/gpu_check.py``, takes its recipes from it).  A recipe missing here, or an entry without a recipe, fails
``tests/test_catalog.py``: a new recipe is listed, and checked on a GPU, by adding one line below.

"Shows" is what a small run of a CPU recipe measures (numbers and checks: ``docs/results.md``); for a GPU-sized
recipe it says what the recipe is for: these hold the paper's settings and are tested here on small data only.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

RECIPE_DIR = Path(__file__).resolve().parent

PAPERS: Dict[str, tuple] = {  # method key -> (method, paper)
    "fox": ("FoX, Forgetting Transformer",
            "Lin et al., Forgetting Transformer: Softmax Attention with a Forget Gate, ICLR 2025 (arXiv 2503.02130)"),
    "cbsom": ("CB-SOM, credit-based self-organizing maps",
              "Dehghani et al., ICLR 2025 (OpenReview wMgr7wBuUo)"),
    "feasible": ("Feasible Learning",
                 "Ramirez et al., Feasible Learning, AISTATS 2025 (arXiv 2501.14912)"),
    "bias": ("Random weights, learned biases",
             "Williams et al., Expressivity of Neural Networks with Random Weights and Learned Biases, ICLR 2025 "
             "(arXiv 2407.00957)"),
    "spma": ("SPMA, softmax policy mirror ascent",
             "Asad et al., Fast Convergence of Softmax Policy Mirror Ascent, AISTATS 2025 (arXiv 2411.12042)"),
    "softmoe": ("SoftMoE tokenization for DQN",
                "Sokar et al., Don't flatten, tokenize! Unlocking the key to SoftMoE's efficacy in deep RL, "
                "ICLR 2025 (arXiv 2410.01930)"),
    "staggered": ("Staggered asynchronous inference",
                  "Riemer et al., Realtime Reinforcement Learning: Towards Rapid Asynchronous Deployment of Large "
                  "Models, ICLR 2025 (arXiv 2412.14355)"),
    "fair_wcmdp": ("Fair allocation in weakly coupled MDPs (GGF LP, CP-DRL)",
                   "Tu et al., Fair Resource Allocation in Weakly Coupled Markov Decision Processes, AISTATS 2025 "
                   "(arXiv 2411.09804)"),
    "dualformer": ("Dualformer",
                   "Su et al., Dualformer: Controllable Fast and Slow Thinking by Learning with Randomized Reasoning "
                   "Traces, ICLR 2025 (arXiv 2410.09918)"),
    "nabla_gfn": ("Nabla-GFlowNet diffusion alignment",
                  "Liu et al., Efficient Diversity-Preserving Diffusion Alignment via Gradient-Informed GFlowNets, "
                  "ICLR 2025 (arXiv 2412.07775)"),
    "async_rlhf": ("Asynchronous off-policy RLHF (Online DPO)",
                   "Noukhovitch et al., Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language "
                   "Models, ICLR 2025 (arXiv 2410.18252)"),
}

ROLES = ("method", "baseline", "prior")
SIZES = ("cpu", "gpu")


@dataclass(frozen=True)
class Entry:
    method: str   # a key of PAPERS
    role: str     # "method": the paper's method; "baseline": what it is compared with; "prior": a model it needs
    size: str     # "cpu": runs on a laptop on embedded data; "gpu": the paper's scale, needs a GPU (and data)
    shows: str


def _e(method, role, size, shows) -> Entry:
    return Entry(method, role, size, shows)


CATALOG: Dict[str, Entry] = {
    # FoX
    "fox_lm": _e("fox", "method", "cpu", "trained at T=128, FoX's loss stays flat to 4x the training length; "
                 "gates mostly local, a few long-range heads"),
    "fox_pro_lm": _e("fox", "method", "cpu", "the Pro block (token shift, QK-norm, output gate) at the tiny size"),
    "transformer_rope_lm": _e("fox", "baseline", "cpu", "Transformer-RoPE: its loss rises ~0.6 nats beyond the "
                              "training length where FoX's stays flat"),
    "fox_125m": _e("fox", "method", "gpu", "the paper's 125M Pro model, 16k context, per-block FSDP, bf16"),
    "fox_360m": _e("fox", "method", "gpu", "the paper's 360M Pro model, 16k context, per-block FSDP, bf16"),
    "fox_760m": _e("fox", "method", "gpu", "the paper's 760M Pro model (main run, 45Gi tokens), per-block FSDP, bf16"),
    # CB-SOM
    "cbsom_digits": _e("cbsom", "method", "cpu", "topographic kernels in most layers at the baseline's accuracy; "
                       "diverse BMUs, distinct kernels, update nearly orthogonal to the task gradient"),
    "absom_digits": _e("cbsom", "baseline", "cpu", "AB-SOM: few distinct BMUs, homogenised kernels"),
    "resnet_digits": _e("cbsom", "baseline", "cpu", "the same network with the SOM step off: the accuracy and "
                        "no-topography reference"),
    "cbsom_cifar10": _e("cbsom", "method", "gpu", "the ImageNet settings transferred to CIFAR-10 (not a paper number)"),
    "cbsom_imagenet": _e("cbsom", "method", "gpu", "the paper's ImageNet-1k run: topographic ResNet-18, 90 epochs"),
    # Feasible Learning
    "feasible_digits": _e("feasible", "method", "cpu", "FL's worst training loss 0.22x ERM's, CVaR 5% 0.60x, at "
                          "about -1 point of test accuracy; most multipliers end at 0"),
    "rfl_digits": _e("feasible", "method", "cpu", "resilient FL (alpha = 1) on the same protocol as FL and ERM"),
    "erm_digits": _e("feasible", "baseline", "cpu", "ERM on the same model and data order: the heavy-tail reference"),
    "feasible_cifar10": _e("feasible", "method", "gpu", "the paper's CIFAR-10 ResNet-18 run (p = 0.6)"),
    "feasible_utkface": _e("feasible", "method", "gpu", "the paper's UTKFace age-regression run"),
    "feasible_dpo_toy": _e("feasible", "method", "cpu", "FL-DPO's worst pair loss 0.46-0.62x ERM-DPO's, CVaR 5% "
                           "0.63-0.72x, held-out preference accuracy within 3 points"),
    "rfl_dpo_toy": _e("feasible", "method", "cpu", "resilient FL-DPO (alpha = 1), what the authors' scripts run"),
    "dpo_toy": _e("feasible", "baseline", "cpu", "ERM-DPO on the toy pairs: the reference of FL-DPO"),
    "feasible_dpo_orca": _e("feasible", "method", "gpu", "FL-DPO with LoRA on a local instruct model and the Orca "
                            "pairs (the authors' settings)"),
    # Random weights, learned biases
    "bias_only_digits": _e("bias", "method", "cpu", "training only the biases of a frozen random 4096-wide network "
                           "reaches ~0.96 test accuracy; accuracy rises with width"),
    "full_digits": _e("bias", "baseline", "cpu", "every weight trained, same network and seed: ~0.98"),
    "mask_digits": _e("bias", "baseline", "cpu", "mask learning on the same frozen network scores lower and uses "
                      "fewer units"),
    "bias_multitask_digits": _e("bias", "method", "cpu", "one frozen network, five tasks switched by bias set "
                                "(diagonal ~0.92, off-diagonal ~0.12)"),
    "bias_rnn_vanderpol": _e("bias", "method", "cpu", "a bias-only RNN generates Van der Pol with gain 1.5, not "
                             "with 0.5"),
    "bias_multitask_mnist": _e("bias", "method", "gpu", "the paper's MNIST-family multi-task scale: 32,768 hidden "
                               "units, one bias set per dataset"),
    # SPMA and the on-policy foundation
    "spma_tabular": _e("spma", "method", "cpu", "exact tabular SPMA converges linearly; softmax PG at its theory "
                       "step is far slower; SPMA = NPG to O(eta^2)"),
    "spma_cartpole": _e("spma", "method", "cpu", "deep SPMA reaches 500 on CartPole-v1 like PPO and MDPO"),
    "spma_acrobot": _e("spma", "method", "cpu", "deep SPMA on Acrobot-v1 ends above PPO and MDPO (3 seeds)"),
    "spma_inverted_pendulum": _e("spma", "method", "cpu", "deep SPMA on InvertedPendulum-v5 (MuJoCo) reaches "
                                 "1000"),
    "ppo_cartpole": _e("spma", "baseline", "cpu", "PPO-clip in the same loop (1.07-1.18x stable-baselines3's "
                       "throughput)"),
    "mdpo_cartpole": _e("spma", "baseline", "cpu", "MDPO in the same loop"),
    "spma_mujoco": _e("spma", "method", "gpu", "the official MuJoCo settings, 1M steps (Hopper-v5 by default)"),
    # SoftMoE tokenization and the off-policy foundation
    "dqn_softmoe1_minatar": _e("softmoe", "method", "cpu", "one scaled expert over PerConv tokens; at MinAtar scale "
                               "the paper's gain does not appear (routing stays uniform)"),
    "dqn_softmoe4_minatar": _e("softmoe", "method", "cpu", "four experts with the same expert parameters"),
    "dqn_flatten_minatar": _e("softmoe", "baseline", "cpu", "the scaled flatten baseline: ahead at MinAtar scale"),
    "dqn_softmoe4_atari": _e("softmoe", "method", "gpu", "the paper's DQN setting on Atari 2600 (Impala encoder, "
                             "SoftMoE-4)"),
    "der_softmoe1_atari100k": _e("softmoe", "method", "gpu", "the paper's Atari-100k DER setting, one scaled "
                                 "expert"),
    # Staggered asynchronous inference
    "realtime_dqn_freeway_staggered": _e("staggered", "method", "cpu", "at inference delay k = 8, staggered "
                                         "workers act every frame and DQN learns; sequential stays at noop"),
    "realtime_dqn_freeway_sequential": _e("staggered", "baseline", "cpu", "sequential interaction: an action "
                                          "every k frames"),
    "realtime_dqn_freeway_wallclock": _e("staggered", "method", "cpu", "real worker processes in wall-clock time "
                                         "act every t_max / N_I"),
    # Fair resource allocation
    "ggf_lp_machine_replacement": _e("fair_wcmdp", "method", "cpu", "the exact GGF LP lifts the worst machine at "
                                     "about +1% total cost; identical machines: GGF LP = count LP / N"),
    "cpdrl_machine_replacement": _e("fair_wcmdp", "method", "cpu", "CP-DRL (one network, trained on N = 2..5) "
                                    "matches the LP optimum for N <= 6 and at N = 50, equal arms"),
    "ppo_joint_machine_replacement": _e("fair_wcmdp", "baseline", "cpu", "joint-state PPO: further from the "
                                        "optimum, unequal arms"),
    # Dualformer
    "dualformer_maze": _e("dualformer", "method", "cpu", "slow mode writes ~41% shorter traces than the full-trace "
                          "model and is optimal more often; fast mode behind Solution-Only at this scale"),
    "full_trace_maze": _e("dualformer", "baseline", "cpu", "Searchformer: complete A* traces, slow mode only"),
    "solution_only_maze": _e("dualformer", "baseline", "cpu", "plans only, fast mode only"),
    "dualformer_maze30": _e("dualformer", "method", "gpu", "the paper's 30x30 mazes, Searchformer S model"),
    "dualformer_sokoban": _e("dualformer", "method", "gpu", "the paper's Sokoban setting, Searchformer M model"),
    # Nabla-GFlowNet
    "nabla_gfn_ring": _e("nabla_gfn", "method", "cpu", "reward up, samples stay on the prior's support and several "
                         "modes (TV ~0.18 to the exact target); DRaFT and ReFL collapse"),
    "nabla_gfn_digits": _e("nabla_gfn", "method", "cpu", "LoRA alignment of a digits DDPM: closer to the prior's "
                           "3s and more diverse than the baselines"),
    "draft_ring": _e("nabla_gfn", "baseline", "cpu", "DRaFT-1: collapses off the prior's support"),
    "refl_ring": _e("nabla_gfn", "baseline", "cpu", "ReFL: collapses off the prior's support"),
    "draft_digits": _e("nabla_gfn", "baseline", "cpu", "DRaFT-1 on digits: all 3s by reward hacking, low diversity"),
    "refl_digits": _e("nabla_gfn", "baseline", "cpu", "ReFL on digits: all 3s by reward hacking, low diversity"),
    "diffusion_prior_ring": _e("nabla_gfn", "prior", "cpu", "the 2-D ring DDPM the ring tier fine-tunes"),
    "diffusion_prior_digits": _e("nabla_gfn", "prior", "cpu", "the 8x8 digits DDPM the digits tier fine-tunes"),
    "nabla_gfn_sd": _e("nabla_gfn", "method", "gpu", "the paper's Stable Diffusion v1.5 LoRA run (local folders)"),
    # Asynchronous RLHF
    "online_dpo_toy": _e("async_rlhf", "method", "cpu", "Online DPO keeps ~97% of its gold reward as "
                         "off-policyness grows to 64, RLOO and PPO far less"),
    "online_dpo_toy_async": _e("async_rlhf", "method", "cpu", "asynchronous at staleness 1: ~0.6x the "
                               "synchronous update time at equal reward"),
    "rloo_toy": _e("async_rlhf", "baseline", "cpu", "RLOO: loses reward as off-policyness grows"),
    "rloo_toy_async": _e("async_rlhf", "baseline", "cpu", "asynchronous RLOO at staleness 1"),
    "ppo_toy": _e("async_rlhf", "baseline", "cpu", "PPO: loses reward as off-policyness grows"),
    "ppo_toy_async": _e("async_rlhf", "baseline", "cpu", "asynchronous PPO at staleness 1"),
    "online_dpo_tldr": _e("async_rlhf", "method", "gpu", "the paper's TL;DR Online DPO on local Pythia folders, "
                          "actor on a second GPU"),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    method: str
    paper: str
    role: str
    size: str
    shows: str


def recipes(names: Optional[List[str]] = None) -> List[Recipe]:
    """The shipped recipes (every ``recipes/*.yaml``), grouped by method in catalog order, with their entries."""
    found = {p.stem for p in RECIPE_DIR.glob("*.yaml")}
    missing = sorted(found - set(CATALOG))
    if missing:  # a shipped recipe must say what it is
        raise KeyError(f"recipes without a catalog entry in recipes/catalog.py: {', '.join(missing)}")
    out = []
    for name in [n for n in CATALOG if n in found] if names is None else names:
        e = CATALOG[name]
        method, paper = PAPERS[e.method]
        out.append(Recipe(name, f"recipes/{name}.yaml", method, paper, e.role, e.size, e.shows))
    return out


def ls(argv: List[str]) -> int:
    """``python -m recipes ls [--json] [--size cpu|gpu]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m recipes ls", description="List the shipped recipes.")
    ap.add_argument("--json", action="store_true", help="one JSON list of records, for scripts")
    ap.add_argument("--size", choices=SIZES, help="only CPU-sized or only GPU-sized recipes")
    ap.error = one_line_error
    args = ap.parse_args(argv)
    rows = [r for r in recipes() if args.size in (None, r.size)]
    try:
        _print(rows, args.json)
    except BrokenPipeError:  # `python -m recipes ls | head`
        sys.stdout = open(os.devnull, "w")
    return 0


def one_line_error(message: str) -> None:
    """argparse's ``error`` as one ``error: ...`` line and exit code 2 (no usage block)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _print(rows: List[Recipe], as_json: bool) -> None:
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return
    width = max(len(r.name) for r in rows)
    current = None
    for r in rows:
        if r.method != current:
            current = r.method
            print(f"\n{r.method}: {r.paper}")
        print(f"  {r.name:<{width}}  {r.size}  {r.role:<8}  {r.shows}")
    print(f"\n{len(rows)} recipes; run one: python -m recipes fit --config recipes/<name>.yaml")
