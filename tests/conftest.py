import os

import torch

# as the entry point does: flush subnormals before the intra-op pool starts (see recipes/__main__.py)
torch.set_flush_denormal(True)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
