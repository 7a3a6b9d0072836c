"""Training entry point.

    python -m tokenizers_jax.train --config=configs/flowmo.py:tiny --workdir=runs/flowmo_tiny \
        [--config.optim.lr=3e-4 ...]

Re-running the same command resumes from the workdir's latest checkpoint; a change to a field
that defines the model, its data or its checkpoint layout is refused (see
`tokenizers_jax.training.workdir`). SIGTERM or Ctrl-C (SIGINT) saves a checkpoint at the next
step boundary and exits with status 75, or --exit_code_on_preemption (a second Ctrl-C aborts at
once). Errors and exit statuses follow `tokenizers_jax.cli`. On several processes add
--distributed (TPU pods, SLURM, MPI: `jax.distributed.initialize()` finds its peers), or pass
--coordinator_address, --num_processes and --process_id explicitly.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from tokenizers_jax import cli, distributed
from tokenizers_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<model>.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and images")
_EXIT_CODE_ON_PREEMPTION = flags.DEFINE_integer(
    "exit_code_on_preemption", cli.EXIT_PREEMPTED,
    "exit status after SIGTERM/SIGINT stopped the run and its checkpoint was saved (default 75, "
    "EX_TEMPFAIL: resumable; e.g. 0 for schedulers that must not retry)")
flags.adopt_module_key_flags(distributed)
flags.adopt_module_key_flags(cli)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary["stopped"] == "preempted":
        logging.warning("stopped by %s at step %d with its checkpoint saved; re-run the same "
                        "command to resume (exit status %d)", summary["signal"],
                        summary["step"], _EXIT_CODE_ON_PREEMPTION.value)
        return _EXIT_CODE_ON_PREEMPTION.value
    logging.info("finished at step %d", summary["step"])
    return 0


if __name__ == "__main__":
    cli.run(main)
