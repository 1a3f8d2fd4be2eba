"""Convert between the official FoX Hugging Face checkpoints and ``FoXTransformer``, in both directions.

The official code (``zhixuan-lin/forgetting-transformer``, ``src/forgetting_transformer/model/``) saves
``ForgettingTransformerForCausalLM`` (``model_type: forgetting_transformer-project_fox``; the FoX LLaMA / Pro models and
the Transformer (Pro) baseline, which is the same code with ``fgate_type: none, use_rope: true``) and
``TransformerForCausalLM`` (``model_type: transformer-project_fox``; the Transformer (LLaMA) baseline, same parameter
layout, RoPE on, no gate).  Both are read here; the FoX layout is written.

Parameter names, official -> ours (per layer ``i``; ``H`` heads of size ``D``)::

    model.embeddings.weight                      embed.weight
    model.layers.i.attn_norm.weight              blocks.i.attn_norm.weight
    model.layers.i.attn.q_proj.weight            blocks.i.attn.q_proj.weight
    model.layers.i.attn.{k,v}_proj.weight        blocks.i.attn.{k,v}_proj.weight        (no token shift)
    model.layers.i.attn.{k,v}_proj.linear.weight blocks.i.attn.{k,v}_proj.weight        (ShiftLinear, Pro)
    model.layers.i.attn.{k,v}_proj.shift_proj.weight  blocks.i.attn.{k,v}_shift.mix_proj.weight  (H, d)
    model.layers.i.attn.o_proj.weight            blocks.i.attn.o_proj.weight
    model.layers.i.attn.fgate_proj.{weight,bias} blocks.i.attn.fgate_proj.{weight,bias}  (fgate_type full)
    model.layers.i.attn.fgate_bias               blocks.i.attn.fgate_bias               (bias_only / fixed)
    model.layers.i.attn.{q,k}_norm.weight        blocks.i.attn.{q,k}_norm.weight        (D,) shared / (H*D,) <-> (H, D)
    model.layers.i.attn.output_norm.weight       blocks.i.attn.o_norm.weight            (H*D,) <-> (H, D)
    model.layers.i.attn.ogate_proj.weight        blocks.i.attn.g_proj.weight
    model.layers.i.mlp_norm.weight               blocks.i.mlp_norm.weight
    model.layers.i.mlp.gate_proj.weight          blocks.i.mlp.gate_proj.weight          (2I, d): [gate; up], same order
    model.layers.i.mlp.down_proj.weight          blocks.i.mlp.down_proj.weight
    model.norm.weight                            norm.weight
    lm_head.weight                               lm_head.weight

Rotary ``inv_freq`` buffers are not parameters and are skipped.  Official settings ``FoXTransformer`` cannot
represent raise ``ValueError`` naming the field (see ``config_from_official``).  ``log_pruning_tolerance`` (adaptive
computation pruning) is accepted and dropped: it only skips attention whose total weight is below
``exp(log_pruning_tolerance)``, and our attention computes everything exactly.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from lightning_modules.fox_model import GATE_TYPES, FoXConfig, FoXTransformer
from lightning_modules.layers.mlp import swiglu_hidden_size

FOX_TYPE = "forgetting_transformer-project_fox"
TRANSFORMER_TYPE = "transformer-project_fox"
PRO_FLAGS = ("use_k_shift", "use_v_shift", "qk_norm", "use_output_gate", "use_output_norm")
OUR_NORM_EPS = 1e-6  # FoXTransformer's block / final / output norms (the qk-norms use 1e-5, as the official code)

# Defaults of the official configuration classes for every field the official modelling code reads.
COMMON_DEFAULTS = dict(vocab_size=32000, hidden_size=2048, hidden_ratio=4, intermediate_size=None,
                       num_hidden_layers=24, num_heads=32, num_kv_heads=None, hidden_act="swish", window_size=None,
                       initializer_range=0.02, norm_eps=1e-6, tie_word_embeddings=False, rope_base=500000.0)
FOX_DEFAULTS = dict(COMMON_DEFAULTS, use_rope=False, use_output_gate=False, ogate_act="sigmoid", fgate_type="full",
                    fgate_bias_init=False, decay_time_min=None, decay_time_max=None, use_output_norm=False,
                    qk_norm=False, qk_norm_share_param_across_head=False, use_k_shift=False, use_v_shift=False,
                    log_pruning_tolerance=None)
TRANSFORMER_DEFAULTS = dict(COMMON_DEFAULTS, use_rope=True)


def _unsupported(field: str, value, why: str) -> ValueError:
    return ValueError(f"official config {field}={value!r} is not supported: {why}")


def _mlp_settings(d: int, hidden_ratio, intermediate_size) -> Tuple[float, int]:
    """(hidden_ratio, mlp_multiple_of) giving the official MLP width (the official rule is ours with multiple 256)."""
    ratio = 4.0 if hidden_ratio is None else float(hidden_ratio)
    if intermediate_size is None or swiglu_hidden_size(d, ratio, 256) == intermediate_size:
        return ratio, 256
    size = int(intermediate_size)
    if size <= 0:
        raise _unsupported("intermediate_size", intermediate_size, "expected a positive integer")
    for r, m in ((1.5 * size / d, size), (1.5 * size / d, 1), (1.5 * (size + 0.5) / d, 1)):
        if swiglu_hidden_size(d, r, m) == size:
            return r, m
    raise _unsupported("intermediate_size", intermediate_size, "no hidden_ratio/mlp_multiple_of reproduces it")


def config_from_official(official_cfg: dict, **overrides) -> FoXConfig:
    """A ``FoXConfig`` equal in function to an official ``config.json`` (a dict).  ``overrides`` (e.g.
    ``attn_backend``) are passed to ``FoXConfig``.  Unrepresentable settings raise a one-line ``ValueError``."""
    model_type = official_cfg.get("model_type", FOX_TYPE)
    if model_type not in (FOX_TYPE, TRANSFORMER_TYPE):
        raise _unsupported("model_type", model_type, f"expected {FOX_TYPE!r} or {TRANSFORMER_TYPE!r}")
    is_fox = model_type == FOX_TYPE
    c = dict(FOX_DEFAULTS if is_fox else TRANSFORMER_DEFAULTS)
    c.update({k: v for k, v in official_cfg.items() if k in c})
    if not is_fox:  # the LLaMA Transformer baseline: the FoX code with no gate and no Pro features
        c.update(fgate_type="none", fgate_bias_init=False, decay_time_min=None, decay_time_max=None,
                 **{f: False for f in PRO_FLAGS})
    if c["tie_word_embeddings"]:
        raise _unsupported("tie_word_embeddings", True, "FoXTransformer has an untied lm_head")
    if c["num_kv_heads"] not in (None, c["num_heads"]):
        raise _unsupported("num_kv_heads", c["num_kv_heads"], f"no GQA; expected null or num_heads={c['num_heads']}")
    if c["window_size"] is not None and not is_fox:  # the FoX layer ignores window_size; the Transformer uses it
        raise _unsupported("window_size", c["window_size"], "no sliding-window attention; expected null")
    if c["hidden_act"] not in ("swish", "silu"):
        raise _unsupported("hidden_act", c["hidden_act"], "the MLP is SwiGLU; expected 'swish'")
    if not math.isclose(float(c["norm_eps"]), OUR_NORM_EPS, rel_tol=1e-9):
        raise _unsupported("norm_eps", c["norm_eps"], f"FoXTransformer's RMSNorms use eps={OUR_NORM_EPS}")
    flags = {f: bool(c[f]) for f in PRO_FLAGS}
    if len(set(flags.values())) > 1:
        listed = ", ".join(f"{f}={v}" for f, v in flags.items())
        raise ValueError(f"official config mixes Pro features ({listed}) and is not supported: FoXTransformer has "
                         "all five on (block='pro') or all off (block='llama')")
    pro = flags["qk_norm"]
    if pro and c["ogate_act"] != "sigmoid":
        raise _unsupported("ogate_act", c["ogate_act"], "the output gate is sigmoid")
    fgate = c["fgate_type"]
    if fgate not in GATE_TYPES:
        raise _unsupported("fgate_type", fgate, f"expected one of {', '.join(GATE_TYPES)}")
    bias_init = None
    if c["fgate_bias_init"]:
        if fgate not in ("bias_only", "fixed"):
            raise _unsupported("fgate_bias_init", True, f"applies to fgate_type bias_only/fixed, not {fgate!r}")
        lo, hi = c["decay_time_min"], c["decay_time_max"]
        if lo is None or hi is None or not 1.0 <= float(lo) <= float(hi):
            raise _unsupported("decay_time_min", lo, f"with decay_time_max={hi!r} expected 1 <= min <= max")
        bias_init = [float(lo), float(hi)]
    ratio, multiple = _mlp_settings(int(c["hidden_size"]), c["hidden_ratio"], c["intermediate_size"])
    kwargs = dict(vocab_size=int(c["vocab_size"]), d_model=int(c["hidden_size"]),
                  n_layers=int(c["num_hidden_layers"]), n_heads=int(c["num_heads"]), block="pro" if pro else "llama",
                  hidden_ratio=ratio, mlp_multiple_of=multiple, fgate=fgate, fgate_bias_init=bias_init,
                  rope=bool(c["use_rope"]), rope_base=float(c["rope_base"]),
                  qk_norm_share_across_heads=bool(pro and c["qk_norm_share_param_across_head"]),
                  init_std=float(c["initializer_range"]))
    kwargs.update(overrides)
    return FoXConfig(**kwargs)


def official_config(cfg: FoXConfig) -> dict:
    """The official ``config.json`` contents (FoX layout) for ``cfg``."""
    if cfg.fgate == "fixed" and cfg.fgate_bias_init is None:
        raise ValueError("fgate='fixed' without fgate_bias_init cannot be written: the official code requires "
                         "fgate_bias_init with decay_time_min/decay_time_max for fixed gates")
    pro = cfg.block == "pro"
    out = dict(FOX_DEFAULTS)
    out.update(model_type=FOX_TYPE, architectures=["ForgettingTransformerForCausalLM"],
               vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
               num_heads=cfg.n_heads, hidden_ratio=cfg.hidden_ratio,
               intermediate_size=None if cfg.mlp_multiple_of == 256 else
               swiglu_hidden_size(cfg.d_model, cfg.hidden_ratio, cfg.mlp_multiple_of),
               initializer_range=cfg.init_std, norm_eps=OUR_NORM_EPS, use_rope=cfg.rope, rope_base=cfg.rope_base,
               fgate_type=cfg.fgate, fgate_bias_init=cfg.fgate_bias_init is not None,
               decay_time_min=cfg.fgate_bias_init[0] if cfg.fgate_bias_init else None,
               decay_time_max=cfg.fgate_bias_init[1] if cfg.fgate_bias_init else None,
               qk_norm_share_param_across_head=bool(pro and cfg.qk_norm_share_across_heads),
               **{f: pro for f in PRO_FLAGS})
    return out


# ------------------------------------------------------------------------------------------------------------------
def key_map(cfg: FoXConfig) -> Dict[str, str]:
    """Official parameter name -> our parameter name, for every tensor of the model."""
    m = {"model.embeddings.weight": "embed.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        o, u = f"model.layers.{i}.", f"blocks.{i}."
        pairs = [("attn_norm.weight", "attn_norm.weight"), ("mlp_norm.weight", "mlp_norm.weight"),
                 ("mlp.gate_proj.weight", "mlp.gate_proj.weight"), ("mlp.down_proj.weight", "mlp.down_proj.weight"),
                 ("attn.q_proj.weight", "attn.q_proj.weight"), ("attn.o_proj.weight", "attn.o_proj.weight")]
        for kv in ("k", "v"):
            if cfg.block == "pro":
                pairs += [(f"attn.{kv}_proj.linear.weight", f"attn.{kv}_proj.weight"),
                          (f"attn.{kv}_proj.shift_proj.weight", f"attn.{kv}_shift.mix_proj.weight")]
            else:
                pairs.append((f"attn.{kv}_proj.weight", f"attn.{kv}_proj.weight"))
        if cfg.fgate == "full":
            pairs += [("attn.fgate_proj.weight", "attn.fgate_proj.weight"),
                      ("attn.fgate_proj.bias", "attn.fgate_proj.bias")]
        elif cfg.fgate in ("bias_only", "fixed"):
            pairs.append(("attn.fgate_bias", "attn.fgate_bias"))
        if cfg.block == "pro":
            pairs += [("attn.q_norm.weight", "attn.q_norm.weight"), ("attn.k_norm.weight", "attn.k_norm.weight"),
                      ("attn.output_norm.weight", "attn.o_norm.weight"),
                      ("attn.ogate_proj.weight", "attn.g_proj.weight")]
        m.update({o + a: u + b for a, b in pairs})
    return m


def our_shapes(cfg: FoXConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of ``FoXTransformer(cfg)``'s state dict with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = FoXTransformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_rotary_buffer(key: str) -> bool:
    return ".rotary." in key or key.endswith(("inv_freq", "_cos_cached", "_sin_cached"))


def _check_keys(have, expected, what: str) -> None:
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected]
    if missing or unexpected:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{len(keys)} {name} key(s): {', '.join(keys[:4])}{more}")
        raise ValueError(f"{what}: {'; '.join(parts)}; expected the {len(expected)} tensors of that layout")


def _head_norm_keys(cfg: FoXConfig) -> List[str]:
    """Our keys whose official layout is flat ``(H*D,)`` and ours ``(H, D)``."""
    keys = [f"blocks.{i}.attn.o_norm.weight" for i in range(cfg.n_layers)] if cfg.block == "pro" else []
    if cfg.block == "pro" and not cfg.qk_norm_share_across_heads:
        keys += [f"blocks.{i}.attn.{n}_norm.weight" for i in range(cfg.n_layers) for n in ("q", "k")]
    return keys


def state_dict_from_official(sd: Dict[str, torch.Tensor], cfg: FoXConfig) -> Dict[str, torch.Tensor]:
    """Official ``ForgettingTransformerForCausalLM`` state dict -> ``FoXTransformer(cfg)`` state dict."""
    names = key_map(cfg)
    sd = {k: v for k, v in sd.items() if not _is_rotary_buffer(k)}
    layout = "pro" if cfg.block == "pro" else "llama"
    _check_keys(sd, names, f"official checkpoint does not match the {layout} block / fgate={cfg.fgate} layout")
    shapes, flat = our_shapes(cfg), set(_head_norm_keys(cfg))
    _check_keys(set(names.values()), shapes, "converter and FoXTransformer disagree")
    out = {}
    for ok, uk in names.items():
        t = sd[ok]
        if uk in flat and t.dim() == 1 and t.numel() == math.prod(shapes[uk]):
            t = t.reshape(shapes[uk])
        if tuple(t.shape) != shapes[uk]:
            raise ValueError(f"official tensor {ok} has shape {tuple(t.shape)}; expected {shapes[uk]} for {uk}")
        out[uk] = t
    return out


def state_dict_to_official(sd: Dict[str, torch.Tensor], cfg: FoXConfig) -> Dict[str, torch.Tensor]:
    """``FoXTransformer(cfg)`` state dict -> official ``ForgettingTransformerForCausalLM`` state dict."""
    names = key_map(cfg)
    shapes, flat = our_shapes(cfg), set(_head_norm_keys(cfg))
    _check_keys(sd, shapes, "state dict does not match FoXTransformer(cfg)")
    out = {}
    for ok, uk in names.items():
        t = sd[uk]
        if tuple(t.shape) != shapes[uk]:
            raise ValueError(f"tensor {uk} has shape {tuple(t.shape)}; expected {shapes[uk]}")
        out[ok] = t.reshape(-1) if uk in flat else t
    return out


# ------------------------------------------------------------------------------------------------------------------
def read_official_weights(folder: str) -> Dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: ``model.safetensors`` or ``pytorch_model.bin``, or their sharded
    ``*.index.json`` form."""
    root = Path(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = root / index_name
        if index.is_file():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        elif (root / single).is_file():
            files = [single]
        else:
            continue
        out: Dict[str, torch.Tensor] = {}
        for name in files:
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {name}, which is not in {root}")
            out.update(_read_tensors(path))
        return out
    raise FileNotFoundError(f"{root} has no model.safetensors or pytorch_model.bin (nor a sharded *.index.json); "
                            "expected a Hugging Face model folder")


def _read_tensors(path) -> dict:
    """A ``.safetensors`` file or a ``torch.save`` file (weights only); unreadable files raise a one-line ValueError."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / truncated / not a tensor file: the reader's own message, first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {first}") from err


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def load_official(path: str, **overrides) -> Tuple[FoXConfig, Dict[str, torch.Tensor]]:
    """Read an official Hugging Face folder -> ``(FoXConfig, our state dict)``; ``overrides`` go to ``FoXConfig``."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; expected a Hugging Face model folder with config.json")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model folder "
                                "(config.json + model.safetensors or pytorch_model.bin)")
    raw = _read_json(root / "config.json")
    weights = read_official_weights(path)
    if raw.get("qk_norm") and "qk_norm_share_param_across_head" not in raw:  # written before the flag existed
        q = weights.get("model.layers.0.attn.q_norm.weight")
        raw["qk_norm_share_param_across_head"] = q is not None and q.numel() != raw.get("hidden_size", 2048)
    cfg = config_from_official(raw, **overrides)
    return cfg, state_dict_from_official(weights, cfg)


def save_official(model: FoXTransformer, folder: str) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the official layout; returns the folder."""
    return write_official(model.cfg, model.state_dict(), folder)


def write_official(cfg: FoXConfig, state_dict: Dict[str, torch.Tensor], folder: str) -> Path:
    """``save_official`` from a config and our state dict."""
    from safetensors.torch import save_file

    cfg_dict = official_config(cfg)
    tensors = state_dict_to_official(state_dict, cfg)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------------------------------------------------------
LM_CLASS_PATH = "lightning_modules.fox_lm.FoXLM"


def foxlm_kwargs(cfg: FoXConfig) -> dict:
    """``FoXLM`` init arguments that build ``FoXTransformer(cfg)``."""
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                block=cfg.block, hidden_ratio=cfg.hidden_ratio, mlp_multiple_of=cfg.mlp_multiple_of, fgate=cfg.fgate,
                fgate_bias_init=cfg.fgate_bias_init, rope=cfg.rope, rope_base=cfg.rope_base,
                qk_norm_share_across_heads=cfg.qk_norm_share_across_heads, init_std=cfg.init_std,
                attn_backend=cfg.attn_backend, attn_block_size=cfg.attn_block_size)


def lightning_checkpoint(cfg: FoXConfig, state_dict: Dict[str, torch.Tensor], **lm_kwargs) -> dict:
    """A checkpoint dict for ``FoXLM`` (loadable by ``FoXLM.load_from_checkpoint`` and ``trainer.validate(ckpt_path=)``
    / ``python -m recipes validate --ckpt_path``); ``lm_kwargs`` set other ``FoXLM`` arguments (``lr``, ...)."""
    import lightning as L

    from lightning_modules.fox_lm import FoXLM

    with torch.device("meta"):  # no random init of a large model: checks names and shapes only
        lm = FoXLM(**{**foxlm_kwargs(cfg), **lm_kwargs})
    lm.model.load_state_dict(state_dict, strict=True, assign=True)
    hparams = {**dict(lm.hparams), "_class_path": LM_CLASS_PATH}
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": L.__version__,
            "state_dict": {f"model.{k}": v.detach().cpu().contiguous() for k, v in state_dict.items()},
            "hparams_name": "kwargs", "hyper_parameters": hparams}


def official_to_lightning(hf_folder: str, out_path: str, **lm_kwargs) -> FoXConfig:
    """Official Hugging Face folder -> Lightning checkpoint for ``FoXLM`` at ``out_path``; returns the config.
    ``lm_kwargs`` named like ``FoXConfig``'s runtime fields (``attn_backend``, ``attn_block_size``) go there too."""
    runtime = {k: lm_kwargs[k] for k in ("attn_backend", "attn_block_size") if k in lm_kwargs}
    cfg, sd = load_official(hf_folder, **runtime)
    ckpt = lightning_checkpoint(cfg, sd, **{k: v for k, v in lm_kwargs.items() if k not in runtime})
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out_path)
    return cfg


def lightning_to_official(ckpt_path: str, out_folder: str) -> FoXConfig:
    """``FoXLM`` Lightning checkpoint -> official Hugging Face folder (``config.json`` + ``model.safetensors``)."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    ckpt = _read_tensors(ckpt_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path} has no 'state_dict'; expected a Lightning checkpoint of FoXLM")
    hp = dict(ckpt.get("hyper_parameters") or {})
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if "embed.weight" not in sd:
        raise ValueError(f"{ckpt_path} has no model.embed.weight; expected a Lightning checkpoint of FoXLM")
    if hp.get("vocab_size") is None:
        hp["vocab_size"] = sd["embed.weight"].shape[0]
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "block", "hidden_ratio", "mlp_multiple_of", "fgate",
              "fgate_bias_init", "rope", "rope_base", "qk_norm_share_across_heads", "init_std")
    absent = [f for f in fields[1:] if f not in hp]
    if absent:
        raise ValueError(f"{ckpt_path} hyper_parameters lack {', '.join(absent)}; expected a checkpoint of FoXLM")
    cfg = FoXConfig(**{f: hp[f] for f in fields})
    write_official(cfg, sd, out_folder)
    return cfg
