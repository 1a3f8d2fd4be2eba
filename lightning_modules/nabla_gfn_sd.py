"""The paper's real scale for the Nabla-GFlowNet recipes (spec nabla_gfn.md 2.1): a Stable-Diffusion-style
``diffusers`` model folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) as the prior,
text prompts with classifier-free guidance, and a reward model from a local folder scored on the decoded images.

* ``load_pipeline(folder, prompts, guidance_scale)``: the frozen U-Net as ``eps(x, t)`` (``TextConditionedEps``)
  guided on the current rows' prompts, the VAE, the prompts' text embeddings (computed once), the latent shape;
* ``Conditioning``: which prompt each row of the next network call uses, shared by the prior and the policy (the
  policy is the prior's copy with LoRA adapters, as the official code does);
* ``DecodedReward``: ``log r(decode(latents / scaling))`` in float32, outside autocast (the authors' README warns
  that bf16 reward gradients are far off);
* ``read_prompts``: a list, or a file (one prompt per line, or JSONL with a ``prompt`` field); ``ANIMALS`` is the
  default list (simple animal names, the kind of prompt set the paper's aesthetic runs use).

Nothing is downloaded: every part is read from the folder with ``local_files_only``.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

ANIMALS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
           "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark",
           "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee",
           "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo")


def read_prompts(prompts: Union[Sequence[str], str, None]) -> List[str]:
    if prompts is None:
        return list(ANIMALS)
    if isinstance(prompts, str):
        if not os.path.isfile(prompts):
            raise FileNotFoundError(f"prompt file {prompts} does not exist")
        with open(prompts) as fh:
            lines = [line.strip() for line in fh if line.strip()]
        out = [json.loads(line)["prompt"] if line.startswith("{") else line for line in lines]
    else:
        out = [str(p) for p in prompts]
    if not out:
        raise ValueError("no prompts given (an empty list or file)")
    return out


class Conditioning:
    """The text embeddings of every prompt and which prompt each row of the next network call uses."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        self.cond, self.uncond = cond, uncond
        self.rows: Optional[torch.Tensor] = None

    def use(self, prompt_index: torch.Tensor) -> None:
        self.rows = prompt_index

    def to(self, device) -> "Conditioning":
        self.cond, self.uncond = self.cond.to(device), self.uncond.to(device)
        return self


class TextConditionedEps(nn.Module):
    """``eps(x, t)`` of a ``UNet2DConditionModel`` on the current rows' prompts, with classifier-free guidance
    ``eps_u + w (eps_c - eps_u)`` (``w = 1``: the conditional prediction alone)."""

    def __init__(self, unet: nn.Module, conditioning: Conditioning, guidance_scale: float):
        super().__init__()
        self.unet, self.guidance = unet, float(guidance_scale)
        self.conditioning = conditioning

    def __deepcopy__(self, memo):  # the copy (the policy) shares the prompt state with the prior
        import copy

        new = TextConditionedEps.__new__(TextConditionedEps)
        nn.Module.__init__(new)
        new.unet, new.guidance, new.conditioning = copy.deepcopy(self.unet, memo), self.guidance, self.conditioning
        return new

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.conditioning
        if c.rows is None or len(c.rows) != len(x):
            raise RuntimeError(f"{len(x)} rows but prompts chosen for {None if c.rows is None else len(c.rows)}")
        cond = c.cond.to(x.device)[c.rows.to(x.device)]
        if self.guidance == 1.0:
            return self.unet(x, t, encoder_hidden_states=cond).sample
        uncond = c.uncond.to(x.device).expand(len(x), -1, -1)
        eps = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = eps.chunk(2)
        return eps_u + self.guidance * (eps_c - eps_u)


class DecodedReward(nn.Module):
    def __init__(self, vae: nn.Module, reward: nn.Module):
        super().__init__()
        self.vae, self.reward = vae, reward
        self.scaling = float(getattr(vae.config, "scaling_factor", 0.18215))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(latents.device.type, enabled=False):
            images = self.vae.decode(latents.float() / self.scaling).sample.clamp(-1, 1)
            return self.reward(images).float()


def load_pipeline(folder: str, prompts: Union[Sequence[str], str, None], guidance_scale: float = 5.0):
    """``(prior eps (frozen), hyperparameters (schedule source, latent shape), vae, conditioning, prompt list)``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    need = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
            if not os.path.isdir(os.path.join(folder, s))]
    if not os.path.isdir(folder) or need:
        raise FileNotFoundError(f"model folder {folder} is not a diffusers pipeline folder (missing "
                                f"{', '.join(need) if os.path.isdir(folder) else 'the folder itself'})")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True).eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True).eval()
    texts = read_prompts(prompts)
    with torch.no_grad():
        ids = tok(texts + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        emb = enc(ids)[0]
    conditioning = Conditioning(emb[:-1], emb[-1:])
    prior = TextConditionedEps(unet, conditioning, guidance_scale).eval().requires_grad_(False)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    hp = {"task": "sd", "shape": [unet.config.in_channels, size, size], "scheduler_folder": folder,
          "net": {"kind": "unet"}}
    return prior, hp, vae, conditioning, texts


def latent_metrics(x: torch.Tensor, reward: nn.Module) -> dict:
    """Reward and the mean pairwise distance of the (flattened) latents, a diversity proxy (DreamSim needs
    downloads)."""
    with torch.no_grad():
        r = reward(x)
    flat = x[:256].flatten(1).double()
    n = len(flat)
    return {"reward": float(r.mean()), "pair_dist": float(torch.cdist(flat, flat).sum() / max(1, n * (n - 1)))}
