"""Convert FoX checkpoints between the official Hugging Face layout and this project's ``FoXLM`` Lightning checkpoints.

    python scripts/convert_fox_checkpoint.py from-official <hf_folder> <out.ckpt> [--attn-backend B] [--train-seq-len N]
    python scripts/convert_fox_checkpoint.py to-official <lightning.ckpt> <out_folder>

``<hf_folder>`` is a local copy of an official release (e.g. ``huggingface-cli download
zhixuan-lin/fox-pro-760m-longcrawl64-48b --local-dir fox-pro-760m``): ``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin`` (sharded forms with ``*.index.json`` too).  The Lightning checkpoint then evaluates with

    python -m recipes validate --config recipes/fox_lm.yaml --ckpt_path out.ckpt --data.init_args.vocab_size V \\
        --data.init_args.path ... --data.init_args.tokenizer ...

(the architecture comes from the checkpoint's hyper-parameters; ``--data.init_args.vocab_size`` must equal the
checkpoint's, because Lightning refuses a model and a datamodule whose hyper-parameters of one name differ).
Bad input prints one line ``error: ...`` and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-official", help="official Hugging Face folder -> FoXLM Lightning checkpoint")
    a.add_argument("hf_folder")
    a.add_argument("out_ckpt")
    a.add_argument("--attn-backend", default=None, help="FoXLM attn_backend stored in the checkpoint (default auto)")
    a.add_argument("--train-seq-len", type=int, default=None,
                   help="FoXLM train_seq_len (val/loss is measured on positions below it; default: data seq_len)")
    b = sub.add_parser("to-official", help="FoXLM Lightning checkpoint -> official folder (config.json + safetensors)")
    b.add_argument("ckpt")
    b.add_argument("out_folder")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from lightning_modules.fox_official import lightning_to_official, official_to_lightning

        if args.command == "from-official":
            extra = {}
            if args.attn_backend is not None:
                extra["attn_backend"] = args.attn_backend
            if args.train_seq_len is not None:
                extra["train_seq_len"] = args.train_seq_len
            cfg = official_to_lightning(args.hf_folder, args.out_ckpt, **extra)
            print(f"wrote {args.out_ckpt}: FoXLM block={cfg.block} fgate={cfg.fgate} rope={cfg.rope} "
                  f"d_model={cfg.d_model} n_layers={cfg.n_layers} n_heads={cfg.n_heads} vocab={cfg.vocab_size}\n"
                  f"evaluate: python -m recipes validate --config recipes/fox_lm.yaml --ckpt_path {args.out_ckpt} "
                  f"--data.init_args.vocab_size={cfg.vocab_size} --data.init_args.path DATA "
                  "--data.init_args.tokenizer TOKENIZER")
        else:
            cfg = lightning_to_official(args.ckpt, args.out_folder)
            print(f"wrote {args.out_folder}/config.json and model.safetensors (official FoX layout, block={cfg.block})")
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
