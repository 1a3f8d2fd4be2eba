"""Official FoX Hugging Face checkpoints <-> FoXTransformer / FoXLM (lightning_modules/fox_official.py).

The reference below is a float64 transcription of the official modelling code
(``forgetting_transformer/model/forgetting_transformer/modeling_forgetting_transformer.py`` and the Transformer
baseline's ``modeling_transformer.py``), written from reading it: ShiftLinear, shared / per-head QK RMSNorm (eps 1e-5),
NeoX rotary, gate ``logsigmoid``, causal softmax with the decay ``sum_{l=j+1..i} log f_l``, FusedGroupNormGated
(per-head RMS norm then ``* sigmoid(ogate)``), SwiGLU with a fused ``[gate; up]`` projection.
It does not use our layers.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.fox_model import FoXTransformer
from lightning_modules.fox_official import (FOX_TYPE, TRANSFORMER_TYPE, config_from_official, load_official,
                                            official_config, official_to_lightning, save_official,
                                            state_dict_from_official, state_dict_to_official)

ROOT = Path(__file__).resolve().parents[1]
PRO = dict(use_k_shift=True, use_v_shift=True, qk_norm=True, use_output_gate=True, use_output_norm=True)
BASE = dict(model_type=FOX_TYPE, vocab_size=96, hidden_size=64, num_hidden_layers=2, num_heads=2, rope_base=500000.0,
            norm_eps=1e-6, tie_word_embeddings=False)
# tiny versions of the released 760M configs (configs/experiment/longcrawl64/*/*_760m_48b.yaml)
CONFIGS = {
    "fox_pro": dict(BASE, use_rope=False, hidden_ratio=3.5, qk_norm_share_param_across_head=True, **PRO),
    "fox_llama": dict(BASE, use_rope=False, hidden_ratio=4),
    "transformer_pro": dict(BASE, use_rope=True, fgate_type="none", hidden_ratio=3.5,
                            qk_norm_share_param_across_head=True, **PRO),
    "transformer_llama": dict(BASE, model_type=TRANSFORMER_TYPE),  # the other model class, RoPE on by default
    "fox_pro_per_head_qknorm": dict(BASE, hidden_ratio=3.5, **PRO),
    "bias_only_intermediate": dict(BASE, fgate_type="bias_only", fgate_bias_init=True, decay_time_min=2.0,
                                   decay_time_max=64.0, intermediate_size=96),
}


def _get(oc, name, default=None):
    fox_default = {"use_rope": oc.get("model_type") == TRANSFORMER_TYPE, "fgate_type": "full", "hidden_ratio": 4}
    return oc.get(name, fox_default.get(name, default))


def official_state_dict(oc, seed=0):
    """Random tensors with the names and shapes the official modules create for ``oc``."""
    g = torch.Generator().manual_seed(seed)
    d, h, v, n = oc["hidden_size"], oc["num_heads"], oc["vocab_size"], oc["num_hidden_layers"]
    inter = oc.get("intermediate_size") or 256 * math.ceil(int(d * _get(oc, "hidden_ratio") * 2 / 3) / 256)
    mat = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1])  # noqa: E731
    norm = lambda *s: 1 + 0.2 * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    sd = {"model.embeddings.weight": torch.randn(v, d, generator=g, dtype=torch.float64),
          "model.norm.weight": norm(d), "lm_head.weight": mat(v, d)}
    for i in range(n):
        p = f"model.layers.{i}."
        sd.update({p + "attn_norm.weight": norm(d), p + "mlp_norm.weight": norm(d),
                   p + "attn.q_proj.weight": mat(d, d), p + "attn.o_proj.weight": mat(d, d),
                   p + "mlp.gate_proj.weight": mat(2 * inter, d), p + "mlp.down_proj.weight": mat(d, inter)})
        for kv in ("k", "v"):
            if oc.get(f"use_{kv}_shift"):
                sd[p + f"attn.{kv}_proj.linear.weight"] = mat(d, d)
                sd[p + f"attn.{kv}_proj.shift_proj.weight"] = 2 * mat(h, d)
            else:
                sd[p + f"attn.{kv}_proj.weight"] = mat(d, d)
        fgate = _get(oc, "fgate_type") if oc["model_type"] == FOX_TYPE else "none"
        if fgate == "full":
            sd[p + "attn.fgate_proj.weight"] = mat(h, d)
            sd[p + "attn.fgate_proj.bias"] = 1.0 + torch.randn(h, generator=g, dtype=torch.float64)
        elif fgate in ("bias_only", "fixed"):
            sd[p + "attn.fgate_bias"] = 1.0 + torch.randn(h, generator=g, dtype=torch.float64)
        if oc.get("qk_norm"):
            size = d // h if oc.get("qk_norm_share_param_across_head") else d
            sd[p + "attn.q_norm.weight"], sd[p + "attn.k_norm.weight"] = norm(size), norm(size)
        if oc.get("use_output_gate"):
            sd[p + "attn.ogate_proj.weight"] = mat(d, d)
        if oc.get("use_output_norm"):
            sd[p + "attn.output_norm.weight"] = norm(d)
    return sd


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotary(x, base):  # (B, T, H, D), rotate-half (GPT-NeoX) convention; tables in float32 as the official code
    half = x.shape[-1] // 2
    inv = 1.0 / base ** (torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half))
    ang = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv)
    cos, sin = ang.cos().double()[None, :, None], ang.sin().double()[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_forward(sd, oc, ids):
    """Logits of the official model, float64, naive loops."""
    d, h, n = oc["hidden_size"], oc["num_heads"], oc["num_hidden_layers"]
    hd, eps, (b, t) = d // h, oc.get("norm_eps", 1e-6), ids.shape
    x = sd["model.embeddings.weight"][ids]
    for i in range(n):
        w = lambda name: sd[f"model.layers.{i}.{name}"]  # noqa: E731
        u = rms(x, w("attn_norm.weight"), eps)
        q = (u @ w("attn.q_proj.weight").T).view(b, t, h, hd)
        kv = {}
        for name in ("k", "v"):
            if oc.get(f"use_{name}_shift"):
                raw = (u @ w(f"attn.{name}_proj.linear.weight").T).view(b, t, h, hd)
                alpha = torch.sigmoid(u @ w(f"attn.{name}_proj.shift_proj.weight").T)  # (B, T, H)
                out, prev = torch.empty_like(raw), torch.zeros(b, h, hd, dtype=raw.dtype)
                for s in range(t):
                    out[:, s] = alpha[:, s, :, None] * prev + (1 - alpha[:, s, :, None]) * raw[:, s]
                    prev = raw[:, s]
                kv[name] = out
            else:
                kv[name] = (u @ w(f"attn.{name}_proj.weight").T).view(b, t, h, hd)
        k, v = kv["k"], kv["v"]
        if oc.get("qk_norm"):
            shape = (hd,) if oc.get("qk_norm_share_param_across_head") else (h, hd)
            q = rms(q, w("attn.q_norm.weight").view(shape), 1e-5)
            k = rms(k, w("attn.k_norm.weight").view(shape), 1e-5)
        if _get(oc, "use_rope"):
            q, k = rotary(q, oc["rope_base"]), rotary(k, oc["rope_base"])
        fgate = _get(oc, "fgate_type") if oc["model_type"] == FOX_TYPE else "none"
        if fgate == "full":
            log_f = F.logsigmoid(u @ w("attn.fgate_proj.weight").T + w("attn.fgate_proj.bias"))
        elif fgate == "none":
            log_f = torch.zeros(b, t, h, dtype=u.dtype)
        else:
            log_f = F.logsigmoid(w("attn.fgate_bias")).expand(b, t, h)
        o = torch.zeros(b, t, h, hd, dtype=u.dtype)
        for qi in range(t):
            scores = torch.stack([(q[:, qi] * k[:, j]).sum(-1) / math.sqrt(hd) + log_f[:, j + 1:qi + 1].sum(1)
                                  for j in range(qi + 1)], dim=-1)  # (B, H, qi+1)
            o[:, qi] = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v[:, :qi + 1])
        if oc.get("use_output_norm"):
            o = rms(o, w("attn.output_norm.weight").view(h, hd), eps)
        if oc.get("use_output_gate"):
            o = o * torch.sigmoid(u @ w("attn.ogate_proj.weight").T).view(b, t, h, hd)
        x = x + o.reshape(b, t, d) @ w("attn.o_proj.weight").T
        gate, up = (rms(x, w("mlp_norm.weight"), eps) @ w("mlp.gate_proj.weight").T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ w("mlp.down_proj.weight").T
    return rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


def converted_model(oc, sd, dtype=torch.float64):
    cfg = config_from_official(oc)
    model = FoXTransformer(cfg).to(dtype).eval()
    model.load_state_dict(state_dict_from_official(sd, cfg))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_equals_official_reference(name):
    oc = CONFIGS[name]
    sd = official_state_dict(oc)
    ids = torch.randint(0, oc["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = converted_model(oc, sd)(ids), reference_forward(sd, oc, ids)
    assert ref.std() > 0.1  # not a degenerate comparison
    # RoPE: both codes keep float32 rotation tables (ours forms the angles in float64 from float32 frequencies)
    tol = 1e-6 if _get(oc, "use_rope") else 1e-10
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trips_are_identity(name):
    oc = CONFIGS[name]
    sd = official_state_dict(oc)
    cfg = config_from_official(oc)
    back = state_dict_to_official(state_dict_from_official(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    ours = FoXTransformer(cfg).state_dict()
    again = state_dict_from_official(state_dict_to_official(ours, cfg), cfg)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    cfg2 = config_from_official(official_config(cfg))
    assert FoXTransformer(cfg2).state_dict().keys() == ours.keys()
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "block", "fgate", "fgate_bias_init", "rope",
                  "rope_base", "qk_norm_share_across_heads"):
        assert getattr(cfg2, field) == getattr(cfg, field), field


def test_rotary_buffers_are_skipped():
    oc = CONFIGS["transformer_pro"]
    sd = official_state_dict(oc)
    sd["model.layers.0.attn.rotary.inv_freq"] = torch.ones(16)
    assert "blocks.0.attn.rotary.inv_freq" not in state_dict_from_official(sd, config_from_official(oc))


def test_missing_and_unexpected_keys_are_one_line_errors():
    oc = CONFIGS["fox_pro"]
    sd = official_state_dict(oc)
    cfg = config_from_official(oc)
    del sd["model.layers.1.attn.k_proj.shift_proj.weight"]
    key = r"model\.layers\.1\.attn\.k_proj\.shift_proj\.weight"
    with pytest.raises(ValueError, match=r"1 missing key\(s\): " + key) as e:
        state_dict_from_official(sd, cfg)
    assert "\n" not in str(e.value) and "expected" in str(e.value)
    # a LLaMA-layout checkpoint read with a Pro config: many missing and unexpected keys, first few named, counted
    with pytest.raises(ValueError, match=r"missing key\(s\): .*\(\+\d+ more\); \d+ unexpected key\(s\)") as e:
        state_dict_from_official(official_state_dict(CONFIGS["fox_llama"]), cfg)
    assert "\n" not in str(e.value)
    bad = official_state_dict(oc)
    bad["model.layers.0.attn.fgate_proj.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.attn\.fgate_proj\.bias has shape \(5,\)"):
        state_dict_from_official(bad, cfg)


@pytest.mark.parametrize("field, value", [("tie_word_embeddings", True), ("ogate_act", "silu"),
                                          ("use_output_norm", False), ("num_kv_heads", 1),
                                          ("hidden_act", "sigmoid"), ("norm_eps", 1e-5), ("fgate_type", "gated")])
def test_unsupported_config_values_name_the_field(field, value):
    with pytest.raises(ValueError) as e:
        config_from_official({**CONFIGS["fox_pro"], field: value})
    msg = str(e.value)
    assert f"{field}={value!r}" in msg and "\n" not in msg, msg


def test_safetensors_and_sharded_bin_folders_are_read(tmp_path):
    oc = CONFIGS["fox_pro"]
    model = converted_model(oc, official_state_dict(oc), torch.float32)
    folder = save_official(model, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg, sd = load_official(str(folder))
    assert cfg == model.cfg and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    # the same weights as two pytorch_model-*.bin shards with an index, and a config.json without the
    # qk_norm_share_param_across_head field (inferred from the (D,) q_norm weight)
    from safetensors.torch import load_file
    official = load_file(str(folder / "model.safetensors"))
    shards = tmp_path / "sharded"
    shards.mkdir()
    keys = sorted(official)
    weight_map = {}
    for j, part in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{j + 1}-of-00002.bin"
        torch.save({k: official[k] for k in part}, shards / name)
        weight_map.update({k: name for k in part})
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    raw = json.loads((folder / "config.json").read_text())
    del raw["qk_norm_share_param_across_head"]
    (shards / "config.json").write_text(json.dumps(raw))
    cfg2, sd2 = load_official(str(shards))
    assert cfg2.qk_norm_share_across_heads and all(torch.equal(sd2[k], sd[k]) for k in sd)


def test_lightning_checkpoint_loads_and_validates(tmp_path):
    import lightning as L

    from datamodules.text import TextDataModule
    from lightning_modules.fox_lm import FoXLM

    oc = dict(CONFIGS["fox_pro"], vocab_size=256)  # byte vocabulary of the embedded data
    model = converted_model(oc, official_state_dict(oc), torch.float32)
    save_official(model, tmp_path / "hf")
    ckpt = tmp_path / "converted.ckpt"
    official_to_lightning(str(tmp_path / "hf"), str(ckpt))
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(2))
    lm = FoXLM.load_from_checkpoint(ckpt, map_location="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), model(ids), rtol=0, atol=0)
    fresh = FoXLM(**{k: v for k, v in lm.hparams.items()})  # random weights; validate(ckpt_path=) must load them
    dm = TextDataModule(seq_len=16, batch_size=2, eval_factor=2, val_windows=2, max_bytes=100_000)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    out = trainer.validate(fresh, dm, ckpt_path=str(ckpt), verbose=False)
    assert math.isfinite(out[0]["val/loss"])
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in model.state_dict().items())


def test_recipes_validate_uses_the_checkpoint_architecture(tmp_path, capsys):
    from recipes.cli import main as recipes_main

    oc = dict(CONFIGS["fox_pro"], vocab_size=256)
    save_official(converted_model(oc, official_state_dict(oc), torch.float32), tmp_path / "hf")
    ckpt = tmp_path / "converted.ckpt"
    assert convert_main(["from-official", str(tmp_path / "hf"), str(ckpt)]) == 0
    code = recipes_main(["validate", "--config", "recipes/fox_lm.yaml", f"--ckpt_path={ckpt}",  # yaml: llama, d=128
                         f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                         "--data.init_args.max_bytes=100000", "--data.init_args.val_windows=2",
                         "--data.init_args.seq_len=16", "--data.init_args.batch_size=2",
                         # Lightning refuses differing model/data hparams of one name; data vocab_size defaults to null
                         "--data.init_args.vocab_size=256"])
    assert code == 0, capsys.readouterr().err[-2000:]
    saved = (tmp_path / "logs" / "version_0" / "config.yaml").read_text()
    assert "block: pro" in saved and "d_model: 64" in saved
    # and back to the official layout
    assert convert_main(["to-official", str(ckpt), str(tmp_path / "back")]) == 0
    cfg, sd = load_official(str(tmp_path / "back"))
    assert cfg.block == "pro" and cfg.d_model == 64 and cfg.qk_norm_share_across_heads


def convert_main(argv):
    sys.path.insert(0, str(ROOT))
    from scripts.convert_fox_checkpoint import main
    return main(argv)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "scripts/convert_fox_checkpoint.py", "from-official", str(tmp_path),
                           str(tmp_path / "out.ckpt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0], proc.stderr
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["fox_pro"], "tie_word_embeddings": True}))
    torch.save({}, tmp_path / "pytorch_model.bin")
    assert convert_main(["from-official", str(tmp_path), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "tie_word_embeddings=True" in err[0], err
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["fox_pro"]))
    assert convert_main(["from-official", str(tmp_path), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing key(s): model.embeddings.weight" in err[0], err
    assert not (tmp_path / "out.ckpt").exists()
