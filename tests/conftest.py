import os

import torch

# as the entry point does: flush subnormals before the intra-op pool starts (see recipes/__main__.py)
torch.set_flush_denormal(True)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def _top_level(root):
    return {p.name for p in root.iterdir()}


def pytest_sessionstart(session):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    session.config._repo_root_before = (root, _top_level(root))


def pytest_sessionfinish(session, exitstatus):
    """A test must write into its own tmp_path, never into the checkout (reports once landed in the repo root)."""
    root, before = session.config._repo_root_before
    stray = sorted(_top_level(root) - before - {".pytest_cache"})
    if stray:
        print(f"\nerror: tests left files in the repository root: {stray}")
        session.exitstatus = 1
