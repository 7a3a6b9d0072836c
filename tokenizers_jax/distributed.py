"""Multi-process start-up shared by the command-line entry points (flags + initialize)."""

from __future__ import annotations

import jax
from absl import flags, logging

_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "call jax.distributed.initialize() (auto-detected cluster)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "index of this process")


def initialize_from_flags():
    """Joins the other processes when --distributed or --coordinator_address is given."""
    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("process %d/%d, %d devices (%d local)", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count())


def quiet_library_info_logs():
    """Drops library INFO logs from the console; see `tokenizers_jax.cli` (which entry points
    going through `cli.run` get without calling this)."""
    from tokenizers_jax import cli  # pylint: disable=import-outside-toplevel

    cli.install_console_filter()
