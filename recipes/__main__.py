"""Entry point: ``python -m recipes fit --config recipes/fox_lm.yaml``."""
import sys

from callbacks.preemption import ignore_slurm_signals_at_exit, watch_slurm_signals

watch_slurm_signals()  # first: SLURM's --signal warning may land while torch is still importing

if sys.argv[1:2] == ["ls"]:  # the catalog needs neither torch nor Lightning: answer at once
    from recipes.catalog import ls

    raise SystemExit(ls(sys.argv[2:]))

import torch  # noqa: E402

# Flush subnormal floats to zero before any thread pool starts (worker threads inherit the setting).  Gate-decayed
# attention probabilities are often subnormal, and subnormal arithmetic slows the CPU kernels 5-7x.
torch.set_flush_denormal(True)

from recipes.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    ignore_slurm_signals_at_exit()
    raise SystemExit(code)
