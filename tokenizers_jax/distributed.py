"""Start-up shared by the command-line entry points: multi-process flags and log hygiene."""

from __future__ import annotations

import logging as python_logging
import os

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


# Libraries whose INFO records (a dozen lines per checkpoint save) would bury our progress lines.
_QUIET_LIBRARIES = tuple(os.sep + name + os.sep for name in ("orbax", "grain", "jax"))


class _LibraryInfoFilter(python_logging.Filter):
    def filter(self, record: python_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in _QUIET_LIBRARIES)
        return record.levelno >= python_logging.WARNING or not noisy


def quiet_library_info_logs():
    """Drops INFO logs of orbax, grain and jax from the console (their warnings still show)."""
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
