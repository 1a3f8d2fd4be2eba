"""Entry point: ``python -m recipes fit --config recipes/fox_lm.yaml``."""
import torch

# Flush subnormal floats to zero before any thread pool starts (worker threads inherit the setting).  Gate-decayed
# attention probabilities are often subnormal, and subnormal arithmetic slows the CPU kernels 5-7x.
torch.set_flush_denormal(True)

from recipes.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
