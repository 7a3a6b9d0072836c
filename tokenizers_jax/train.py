"""Training entry point.

    python -m tokenizers_jax.train --config=configs/flowmo.py:tiny --workdir=runs/flowmo_tiny \
        [--config.optim.lr=3e-4 ...]

Re-running the same command resumes from the workdir's latest checkpoint. On several processes
add --distributed (TPU pods, SLURM, MPI: `jax.distributed.initialize()` finds its peers), or
pass --coordinator_address, --num_processes and --process_id explicitly.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from tokenizers_jax import distributed
from tokenizers_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<model>.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and images")
flags.adopt_module_key_flags(distributed)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.quiet_library_info_logs()
    distributed.initialize_from_flags()
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("finished (%s) at step %s", summary["stopped"], summary.get("step"))


if __name__ == "__main__":
    app.run(main)
