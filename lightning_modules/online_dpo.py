"""Asynchronous off-policy RLHF (Noukhovitch, Huang, Xhonneux, Hosseini, Agarwal, Courville, ICLR 2025; spec
``async_rlhf.md``): one LightningModule for Online DPO and the losses it is compared with.

The policy is a causal LM (``layers.causal_lm.build_lm``: a local Hugging Face folder, a config, or the toy GRU) with a
frozen reference copy made at the start; the reward model scores ``k`` sampled responses per prompt
(``layers.reward_models``); the gold reward measures the result (on the toy, the proxy can be a Bradley-Terry model
trained on gold-labelled pairs before the first update).  Responses come from the actor process
(``datamodules.rlhf_actor``) stamped with the policy version that made them; ``loss``:

* ``online_dpo`` / ``ipo``: best vs worst of the ``k`` samples by reward, ``-log sigmoid(beta h)`` / IPO, no
  behaviour log-probabilities.  A tie picks the same sample twice (loss log 2, no gradient), as the official
  asynchronous (vLLM) trainer; ``mask_ties`` drops ties from the mean instead.  (The official synchronous trainer
  takes sample 0 over sample 1 on a tie, a pair with an arbitrary gradient; not offered.)
* ``rloo``: leave-one-out advantage of ``score - kl_coef * KL``, PPO-clip on the sequence ratio to the behaviour
  policy;
* ``ppo``: TRL PPOv2 with a critic (a copy of the initial policy with a zero value head; TRL starts it from the
  reward model), GAE over tokens, per-token KL penalty, clipped policy and value losses.  The values (and so GAE and
  the value clip's centre) come from the critic at update time: TRL computes them when the batch is generated, which
  differs only when a batch is used after other updates (N > 1 or asynchronous).  The score is added at the last
  response token (TRL adds it one position later, past EOS, where it also trains the value: the same returns once the
  critic fits), and advantages are whitened per training batch (TRL: per generation batch);
* ``best_of_2``: NLL of the better sample.

Log-probabilities are taken at the sampling temperature (logits / T), as the official code.  Validation samples one
response per held-out prompt at ``eval_temperature`` (default: the sampling temperature; the official TL;DR
evaluation uses 0.01): gold reward, win-rate against the reference responses (the data's, or the reference policy's
samples on the same prompts; ties count half), a few decoded samples; and the KL to the reference,
``sum_t log pi - log ref`` on samples at the sampling temperature (drawn separately when ``eval_temperature``
differs).  All kept in ``eval_history`` for the report (``callbacks.rlhf_report``).
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional

import lightning as L
import torch
from torch import nn

from lightning_modules.layers.causal_lm import build_lm, eos_mask, lm_forward, response_logprobs, sample_responses
from lightning_modules.layers.policy_losses import clip_fraction
from lightning_modules.layers.preference_losses import (best_of_k_nll, dpo_loss, ppo_advantages, ppo_losses,
                                                        ppo_token_rewards, rloo_advantages, rloo_loss, select_pairs)
from lightning_modules.layers.reward_models import BradleyTerryRM, build_reward, fit_bradley_terry

LOSSES = ("online_dpo", "ipo", "rloo", "ppo", "best_of_2")
PAIRWISE = ("online_dpo", "ipo", "rloo", "best_of_2")


class Critic(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, prompts, prompt_mask, responses, response_mask) -> torch.Tensor:
        _, states = lm_forward(self.backbone, prompts, prompt_mask, responses, response_mask, hidden=True)
        return self.head(states).squeeze(-1).float()  # float32 values under bf16-mixed (GAE, the value loss)


class OnlineRLHF(L.LightningModule):
    def __init__(self, policy: Optional[dict] = None, loss: str = "online_dpo", beta: float = 0.1, k: int = 2,
                 temperature: float = 0.7, response_length: int = 8, mask_ties: bool = False,
                 kl_coef: float = 0.05, clip: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
                 gamma: float = 1.0, lam: float = 0.95, reward: Optional[dict] = None, gold: Optional[dict] = None,
                 non_eos_penalty: bool = False, penalty_reward: float = -1.0, proxy_pairs: int = 4096,
                 proxy_steps: int = 300, lr: float = 3e-3, lr_decay: str = "constant", weight_decay: float = 0.0,
                 adam_eps: float = 1e-8,
                 num_samples_logged: int = 8, eval_temperature: Optional[float] = None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r}; expected one of {', '.join(LOSSES)}")
        if loss in PAIRWISE and k < 2:
            raise ValueError(f"model.k={k}: the {loss} loss compares samples of a prompt, it needs k >= 2")
        if k < 1:
            raise ValueError(f"model.k must be >= 1, got {k}")
        if not beta > 0:
            raise ValueError(f"model.beta must be > 0, got {beta}")
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if eval_temperature is not None and not eval_temperature > 0:
            raise ValueError(f"model.eval_temperature must be > 0, got {eval_temperature}")
        if lr_decay not in ("constant", "linear"):
            raise ValueError(f"model.lr_decay={lr_decay!r}; expected constant or linear (to 0 at trainer.max_steps)")
        if response_length < 1:
            raise ValueError(f"model.response_length must be >= 1, got {response_length}")
        policy = dict(policy or {"kind": "tiny"})
        reward = dict(reward or {"kind": "toy"})
        gold = dict(gold or {"kind": "toy"})
        self.save_hyperparameters()
        self.policy_spec = policy
        self.policy = build_lm(policy)
        self.ref = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.critic = Critic(copy.deepcopy(self.policy)) if loss == "ppo" else None
        self.reward_model = build_reward(reward)
        self.gold_model = self.reward_model if gold == reward else build_reward(gold)
        self.reward_model.requires_grad_(False)
        self.gold_model.requires_grad_(False)
        self.register_buffer("proxy_trained", torch.tensor(False))
        self.eos_id: Optional[int] = None
        self.pad_id = 0
        self.eval_history: List[Dict[str, float]] = []
        self.samples: List[Dict[str, str]] = []
        self.decode = None

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "pad_id"):
            self.eos_id, self.pad_id = dm.eos_id, dm.pad_id
            tok = getattr(dm, "tokenizer", None)
            self.decode = tok.decode if tok is not None else None

    def generator_spec(self, device: str, eos_id: Optional[int], pad_id: int) -> dict:
        hp = self.hparams
        return {"kind": "lm", "policy": self.policy_spec, "k": hp.k, "length": hp.response_length,
                "temperature": hp.temperature, "eos_id": eos_id, "pad_id": pad_id, "device": device}

    def on_fit_start(self) -> None:
        if isinstance(self.reward_model, BradleyTerryRM) and not bool(self.proxy_trained):
            self._train_proxy()

    def _train_proxy(self) -> None:
        """The proxy reward model, trained on pairs the reference policy samples, labelled by the gold reward."""
        hp, dm = self.hparams, self.trainer.datamodule
        n = max(1, hp.proxy_pairs)
        data = {k: v.to(self.device) for k, v in dm.prompts_for_reward_model(n).items()}
        p, pm, resp = sample_responses(self.ref, data["prompts"], data["prompt_mask"], 2, hp.response_length,
                                       hp.temperature, seed=self.trainer.datamodule.seed + 11, eos_id=self.eos_id,
                                       pad_id=self.pad_id)
        rm_mask, _ = eos_mask(resp, self.eos_id)
        with torch.no_grad():
            gold = self.gold_model(p, pm, resp, rm_mask)
        self.reward_model.requires_grad_(True)
        with torch.enable_grad(), torch.inference_mode(False):
            stats = fit_bradley_terry(self.reward_model, p, pm, resp, rm_mask, gold, hp.proxy_steps,
                                      seed=dm.seed)
        self.reward_model.requires_grad_(False)
        self.proxy_trained.fill_(True)
        self.proxy_fit = stats

    def configure_optimizers(self):
        params = list(self.policy.parameters()) + (list(self.critic.parameters()) if self.critic is not None else [])
        hp = self.hparams
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, eps=hp.adam_eps)
        if hp.lr_decay == "constant":
            return opt
        total = max(1, int(self.trainer.max_steps))
        if total <= 1:
            raise ValueError("model.lr_decay=linear needs trainer.max_steps (the step the rate reaches 0)")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _scores(self, model, p, pm, resp, rmask, has_eos) -> torch.Tensor:
        s = model(p, pm, resp, rmask).float()
        if self.hparams.non_eos_penalty and self.eos_id is not None:
            s = torch.where(has_eos, s, torch.full_like(s, self.hparams.penalty_reward))
        return s

    # ------------------------------------------------------------------ training
    def training_step(self, dataloader_iter):
        hp = self.hparams
        now = time.perf_counter()
        batch, _, _ = next(dataloader_iter)  # generated now, after publishing this step's weights
        got = time.perf_counter()
        B, k = batch["prompts"].shape[0], hp.k
        p = batch["prompts"].to(self.device).repeat_interleave(k, 0)
        pm = batch["prompt_mask"].to(self.device).repeat_interleave(k, 0)
        resp, rmask = batch["responses"].to(self.device), batch["response_mask"].to(self.device)
        logp_b = batch["logp_behaviour"].to(self.device)
        scores = self._scores(self.reward_model, p, pm, resp, rmask, batch["has_eos"].to(self.device))
        with torch.no_grad():
            ref_logits, _ = lm_forward(self.ref, p, pm, resp, rmask)
            logp_ref = response_logprobs(ref_logits.float(), resp, rmask, hp.temperature)
        logits, _ = lm_forward(self.policy, p, pm, resp, rmask)
        logp = response_logprobs(logits.float(), resp, rmask, hp.temperature)
        seq, seq_b, seq_ref = logp.sum(-1), logp_b.sum(-1), logp_ref.sum(-1)
        stats: Dict[str, torch.Tensor] = {}
        if hp.loss in ("online_dpo", "ipo"):
            c, r, tie = select_pairs(scores.view(B, k))
            loss, stats = dpo_loss(seq[c], seq[r], seq_ref[c], seq_ref[r], hp.beta,
                                   "sigmoid" if hp.loss == "online_dpo" else "ipo", ~tie if hp.mask_ties else None)
            stats["ties"] = tie.float().mean()
        elif hp.loss == "rloo":
            adv = rloo_advantages(scores.view(B, k), seq_b, seq_ref, hp.kl_coef)
            loss = rloo_loss(seq, seq_b, adv, hp.clip)
            stats["clip_fraction"] = clip_fraction(seq.detach(), seq_b, hp.clip)
        elif hp.loss == "ppo":
            values = self.critic(p, pm, resp, rmask)
            v_old = values.detach()
            rewards = ppo_token_rewards(scores, logp_b, logp_ref, rmask, hp.kl_coef)
            adv, ret = ppo_advantages(rewards, v_old, rmask, hp.gamma, hp.lam)
            pg, vf = ppo_losses(logp, logp_b, adv, values, v_old, ret, rmask, hp.clip, hp.value_clip)
            loss = pg + hp.vf_coef * vf
            stats.update(policy_loss=pg.detach(), value_loss=vf.detach(),
                         clip_fraction=(((logp - logp_b).detach().exp() - 1).abs() > hp.clip)[rmask > 0].float().mean())
        else:
            loss = best_of_k_nll(seq, scores.view(B, k))
        version = int(batch["version"])
        log = {"loss": loss.detach(), "score": scores.mean(), "kl": (seq_b - seq_ref).mean(),
               "version": float(version), "staleness": float(self.global_step - version),
               "actor_gen_s": float(batch["gen_s"]), "actor_wait_s": float(batch["wait_s"]),
               "learner_wait_s": got - now, **stats}
        if self.gold_model is not self.reward_model:
            log["gold"] = self._scores(self.gold_model, p, pm, resp, rmask, batch["has_eos"].to(self.device)).mean()
        self.log_dict({f"train/{k}": v for k, v in log.items()}, prog_bar=False, on_step=True, on_epoch=False,
                      batch_size=B)
        self.log("score", log["score"], prog_bar=True, on_step=True, on_epoch=False, logger=False, batch_size=B)
        self.batch_versions.append((self.global_step, version))
        return loss

    @property
    def batch_versions(self) -> list:
        if not hasattr(self, "_versions"):
            self._versions = []
        return self._versions

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batch: dict, seed: int) -> Dict[str, torch.Tensor]:
        """One sample per prompt from the policy (and the reference policy): gold and proxy rewards, KL, wins."""
        hp = self.hparams
        prompts, mask = batch["prompts"].to(self.device), batch["prompt_mask"].to(self.device)
        out = {}
        T_eval = hp.eval_temperature or hp.temperature
        _, _, resp = sample_responses(self.policy, prompts, mask, 1, hp.response_length, T_eval, seed,
                                      self.eos_id, self.pad_id)
        rmask, has_eos = eos_mask(resp, self.eos_id)
        gold = self._scores(self.gold_model, prompts, mask, resp, rmask, has_eos)
        kl_resp, kl_mask = resp, rmask
        if T_eval != hp.temperature:
            _, _, kl_resp = sample_responses(self.policy, prompts, mask, 1, hp.response_length, hp.temperature, seed,
                                             self.eos_id, self.pad_id)
            kl_mask, _ = eos_mask(kl_resp, self.eos_id)
        lp, _ = lm_forward(self.policy, prompts, mask, kl_resp, kl_mask)
        lr, _ = lm_forward(self.ref, prompts, mask, kl_resp, kl_mask)
        kl = (response_logprobs(lp.float(), kl_resp, kl_mask, hp.temperature)
              - response_logprobs(lr.float(), kl_resp, kl_mask, hp.temperature)).sum(-1)
        if "references" in batch:
            ref_resp, ref_mask = batch["references"].to(self.device), batch["reference_mask"].to(self.device)
            ref_eos = torch.ones(len(ref_resp), dtype=torch.bool, device=self.device)
        else:
            _, _, ref_resp = sample_responses(self.ref, prompts, mask, 1, hp.response_length, T_eval, seed,
                                              self.eos_id, self.pad_id)
            ref_mask, ref_eos = eos_mask(ref_resp, self.eos_id)
        gold_ref = self._scores(self.gold_model, prompts, mask, ref_resp, ref_mask, ref_eos)
        out.update(gold=gold, kl=kl, win=(gold > gold_ref).float() + 0.5 * (gold == gold_ref).float(),
                   length=rmask.sum(-1))
        if self.gold_model is not self.reward_model:
            out["proxy"] = self._scores(self.reward_model, prompts, mask, resp, rmask, has_eos)
        self._last_samples = (prompts[:hp.num_samples_logged], mask[:hp.num_samples_logged],
                              resp[:hp.num_samples_logged], rmask[:hp.num_samples_logged], gold[:hp.num_samples_logged])
        return out

    def on_validation_epoch_start(self) -> None:
        self._eval: Dict[str, list] = {}

    def validation_step(self, batch, batch_idx):
        seed = int(self.trainer.datamodule.seed) * 1_000_003 + batch_idx if self.trainer.datamodule else batch_idx
        for key, v in self.evaluate(batch, seed).items():
            self._eval.setdefault(key, []).append(v.float().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._eval:
            return
        row = {"step": int(self.global_step)}
        for key, chunks in self._eval.items():
            row[{"win": "win_rate"}.get(key, key)] = float(torch.cat(chunks).mean())
        self.log_dict({f"val/{k}": float(v) for k, v in row.items() if k != "step"}, prog_bar=False, batch_size=1)
        self.log("val_gold", row["gold"], prog_bar=True, logger=False, batch_size=1)
        if self.trainer.sanity_checking:
            return
        self.eval_history.append(row)
        p, pm, resp, rmask, gold = self._last_samples
        decode = self.decode or (lambda ids: " ".join(str(int(i)) for i in ids))
        self.samples = [{"step": int(self.global_step), "prompt": decode(p[i][pm[i] > 0].tolist()),
                         "response": decode(resp[i][rmask[i] > 0].tolist()), "gold": float(gold[i])}
                        for i in range(len(p))]

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def predict_step(self, batch, batch_idx):
        """One sample per prompt: ``[{"prompt", "response", "gold"}]`` (decoded text, or token ids for the toy)."""
        hp = self.hparams
        prompts, mask = batch["prompts"].to(self.device), batch["prompt_mask"].to(self.device)
        _, _, resp = sample_responses(self.policy, prompts, mask, 1, hp.response_length,
                                      hp.eval_temperature or hp.temperature, batch_idx, self.eos_id, self.pad_id)
        rmask, has_eos = eos_mask(resp, self.eos_id)
        gold = self._scores(self.gold_model, prompts, mask, resp, rmask, has_eos)
        decode = self.decode or (lambda ids: " ".join(str(int(i)) for i in ids))
        return [{"prompt": decode(prompts[i][mask[i] > 0].tolist()),
                 "response": decode(resp[i][rmask[i] > 0].tolist()), "gold": float(gold[i])}
                for i in range(len(prompts))]

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rlhf"] = {"eval_history": list(self.eval_history)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.eval_history = list(checkpoint.get("rlhf", {}).get("eval_history", []))
