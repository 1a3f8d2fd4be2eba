"""Rewards and sample metrics of the Nabla-GFlowNet recipes (spec ``shared/specs/nabla_gfn.md`` 4.1-4.2).

Every reward is a differentiable ``log r(x)`` (the paper's reward models predict log-rewards):

* ``RingReward``: ``-|x - c|^2 / (2 rho^2)`` with ``c = (4, 0)``, ``rho = 2``: its optimum sits just outside the
  prior's ring of modes.  ``ring_target`` gives the exact fine-tuning target ``p_prior(x) r(x)^beta`` of the ring
  prior in closed form (each Gaussian mode stays Gaussian; its weight scales with the reward at the mode);
* ``ClassifierReward``: the log-probability of a digit class or class set under a small CNN trained here on the
  bundled digits (seconds, seeded), plus ``ink`` times the mean pixel value (a smooth "aesthetic-like" term);
* ``FolderReward``: any differentiable reward model in a local folder: a TorchScript ``reward.pt`` mapping images
  to log-rewards, or a ``transformers`` image-classification model whose ``label`` log-probability is the reward.

Metrics: ``ring_metrics`` (reward, on-support rate, mode entropy, TV to the target's mode weights, mean pairwise
distance) and ``image_metrics`` (reward, on-manifold rate, class entropy, feature Frechet distance to reference
samples, mean pairwise feature distance), both from samples.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.nabla_gfn_data import RING_STD, digits, ring_modes


# ---- the 2-D tier ----------------------------------------------------------------------------------------------------
class RingReward(nn.Module):
    def __init__(self, center: Sequence[float] = (4.0, 0.0), rho: float = 2.0):
        super().__init__()
        if rho <= 0:
            raise ValueError(f"reward rho must be > 0, got {rho}")
        self.register_buffer("center", torch.tensor(list(center), dtype=torch.float32), persistent=False)
        self.rho = float(rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.center.to(x.dtype)) ** 2).sum(-1) / (2 * self.rho ** 2)


def ring_target(beta: float, center: Sequence[float] = (4.0, 0.0), rho: float = 2.0,
                std: float = RING_STD) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(weights (K,), means (K, 2), component std)`` of ``p_ring(x) * r(x)^beta`` normalised (float64): component
    ``k`` becomes ``N((mu_k / S^2 + beta c / rho^2) / P, 1/P)`` with ``P = 1/S^2 + beta/rho^2``, its weight
    ``~ exp(-|mu_k - c|^2 / (2 (S^2 + rho^2 / beta)))``."""
    mu, c = ring_modes(), torch.tensor(list(center), dtype=torch.float64)
    precision = 1 / std ** 2 + beta / rho ** 2
    means = (mu / std ** 2 + beta * c / rho ** 2) / precision
    if beta > 0:
        logw = -((mu - c) ** 2).sum(-1) / (2 * (std ** 2 + rho ** 2 / beta))
    else:
        logw = torch.zeros(len(mu), dtype=torch.float64)
    return torch.softmax(logw, 0), means, precision ** -0.5


def ring_metrics(x: torch.Tensor, reward: nn.Module, target_weights: torch.Tensor) -> Dict[str, float]:
    """On-support: within 3 S of a prior mode; mode occupancy (of the on-support samples, by nearest mode), its
    entropy and its total-variation distance to ``target_weights``; mean pairwise distance (first 1,000 samples).
    The reward is computed on ``x``'s device (``reward`` is there too: a submodule on the GPU)."""
    reward_mean = float(reward(x.detach().float()).mean())
    x = x.detach().double().cpu()
    modes = ring_modes()
    dist = torch.cdist(x, modes)
    nearest, which = dist.min(dim=1)
    on = nearest <= 3 * RING_STD
    counts = torch.bincount(which[on], minlength=len(modes)).double()
    occ = counts / counts.sum().clamp(min=1)
    entropy = float(-(occ[occ > 0] * occ[occ > 0].log()).sum())
    sub = x[:1000]
    pair = torch.cdist(sub, sub)
    n = len(sub)
    out = {"reward": reward_mean, "on_support": float(on.double().mean()),
           "mode_entropy": entropy, "tv": float(0.5 * (occ - target_weights.double()).abs().sum()),
           "pair_dist": float(pair.sum() / max(1, n * (n - 1)))}
    out.update({f"mode_{k}": float(occ[k]) for k in range(len(modes))})
    return out


# ---- the digits tier -------------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """A small CNN with smooth activations (its input gradients steer the samples): ``features`` are the 64 units
    before the last layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.SiLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


_CLASSIFIERS: Dict[Tuple[int, int], Tuple[DigitsClassifier, float]] = {}


def digits_classifier(seed: int = 0, epochs: int = 40) -> Tuple[DigitsClassifier, float]:
    """``(frozen classifier, test accuracy)`` trained on the digits training split with noise augmentation (std
    0.1), seeded, cached per process.  About 5 s on one core."""
    key = (seed, epochs)
    if key not in _CLASSIFIERS:
        with torch.inference_mode(False), torch.enable_grad():  # also when first asked for inside an evaluation loop
            _CLASSIFIERS[key] = _train_digits_classifier(seed, epochs)
    return _CLASSIFIERS[key]


def _train_digits_classifier(seed: int, epochs: int) -> Tuple[DigitsClassifier, float]:
    x, y = digits("train")
    x_te, y_te = digits("test")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((net(x_te).argmax(-1) == y_te).float().mean())
    return net, acc


class ClassifierReward(nn.Module):
    """``log sum_{c in classes} p(c | x) + ink * mean(x)`` under ``digits_classifier(seed)``."""

    def __init__(self, classes: Sequence[int] = (3,), ink: float = 0.0, seed: int = 0):
        super().__init__()
        bad = [c for c in classes if not 0 <= int(c) <= 9]
        if not classes or bad:
            raise ValueError(f"reward classes must be digits 0-9, got {list(classes)}")
        self.classes, self.ink = [int(c) for c in classes], float(ink)
        self.classifier = digits_classifier(seed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 under bf16-mixed too (as DecodedReward): its input gradient steers the samples
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            logp = torch.log_softmax(self.classifier(x), dim=-1)
            out = torch.logsumexp(logp[:, self.classes], dim=-1)
            return out + self.ink * x.flatten(1).mean(-1) if self.ink else out


class FolderReward(nn.Module):
    """A differentiable reward model from ``folder``: ``reward.pt`` (TorchScript, images -> log-rewards ``(B,)``),
    or a ``transformers`` image classifier (``config.json``): the log-probability of ``label`` (a name in its
    ``id2label`` or an index), the images resized to its ``image_size``."""

    def __init__(self, folder: str, label: Union[int, str, None] = None):
        super().__init__()
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"reward model folder {folder} does not exist")
        script = os.path.join(folder, "reward.pt")
        self.label, self.size = None, None
        if os.path.isfile(script):
            self.model = torch.jit.load(script, map_location="cpu").eval()
        elif os.path.isfile(os.path.join(folder, "config.json")):
            from transformers import AutoModelForImageClassification

            self.model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()
            names = {str(v): int(k) for k, v in self.model.config.id2label.items()}
            if label is None or (isinstance(label, str) and label not in names and not label.isdigit()):
                raise ValueError(f"reward label {label!r} is not one of the model's labels {sorted(names)}")
            self.label = names.get(str(label), int(label) if str(label).isdigit() else None)
            self.size = getattr(self.model.config, "image_size", None)
        else:
            raise FileNotFoundError(f"reward model folder {folder} has neither reward.pt (TorchScript) nor "
                                    "config.json (a transformers image classifier)")
        for p in self.model.parameters():  # frozen (a ScriptModule has no requires_grad_)
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.label is None:
            return self.model(x).reshape(len(x))
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1 and getattr(self.model.config, "num_channels", 1) == 3:
            x = x.expand(-1, 3, -1, -1)
        return torch.log_softmax(self.model(pixel_values=x).logits, dim=-1)[:, self.label]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` of two feature sets (float64, scipy's sqrtm)."""
    from scipy import linalg

    a, b = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.from_numpy(a).T.cov().numpy(), torch.from_numpy(b).T.cov().numpy()
    root = linalg.sqrtm(ca @ cb)
    root = root.real if hasattr(root, "real") else root
    return float(((mu_a - mu_b) ** 2).sum() + max(0.0, float(ca.trace() + cb.trace() - 2 * root.trace())))


def image_metrics(x: torch.Tensor, reward: nn.Module, classifier: DigitsClassifier,
                  ref_features: Optional[torch.Tensor], classes: Sequence[int] = (),
                  ref_class_features: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Reward; the classifier's view of the samples: on-manifold (max probability >= 0.9), the share labelled as
    one of ``classes``, class entropy; Frechet distance of its features to ``ref_features`` (``fd``: the prior's
    samples) and to ``ref_class_features`` (``fd_class``: the prior's samples labelled as one of ``classes``, what
    ``p_prior r`` looks like for a class reward at beta = 1), and the mean pairwise feature distance (first 1,000
    samples)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # float32, as the reference's features
        feats = classifier.features(x.float())
        prob = torch.softmax(classifier.head(feats), dim=-1)
        r = reward(x.float())
    label = prob.argmax(-1)
    hist = torch.bincount(label.cpu(), minlength=10).double() / len(label)
    sub = feats[:1000].double()
    n = len(sub)
    out = {"reward": float(r.mean()), "on_manifold": float((prob.max(-1).values >= 0.9).double().mean()),
           "class_entropy": float(-(hist[hist > 0] * hist[hist > 0].log()).sum()),
           "pair_dist": float(torch.cdist(sub, sub).sum() / max(1, n * (n - 1)))}
    if classes:
        out["class_rate"] = float(sum(hist[c] for c in classes))
    if ref_features is not None:
        out["fd"] = frechet_distance(feats, ref_features)
    if ref_class_features is not None and len(ref_class_features) > 1:
        out["fd_class"] = frechet_distance(feats, ref_class_features)
    out.update({f"class_{k}": float(hist[k]) for k in range(10)})
    return out


@torch.no_grad()
def sample_records(x: torch.Tensor, reward: nn.Module, first_index: int = 0) -> list:
    """One record per sample for ``predict``: its index, ``log_r``, and the point (``x0``, ``x1``) or, for images,
    the digits classifier's label and confidence and the pixels (space-separated, row-major)."""
    x = x.float()
    log_r = reward(x).cpu().tolist()
    if x.dim() == 2:
        return [{"index": first_index + i, "log_r": f"{r:.5f}", **{f"x{d}": f"{v:.5f}" for d, v in enumerate(p)}}
                for i, (r, p) in enumerate(zip(log_r, x.cpu().tolist()))]
    prob = torch.softmax(digits_classifier()[0].to(x.device)(x), -1).cpu()
    conf, label = prob.max(-1)
    return [{"index": first_index + i, "log_r": f"{r:.5f}", "label": int(lab), "confidence": f"{c:.4f}",
             "pixels": " ".join(f"{v:.3f}" for v in img.flatten().tolist())}
            for i, (r, lab, c, img) in enumerate(zip(log_r, label.tolist(), conf.tolist(), x.cpu()))]
