"""Orbax checkpoints of training workdirs, preemption handling and `load_for_inference`.

Layout of a workdir DIR:
  DIR/config.json                  the resolved config of the run
  DIR/checkpoints/<step>/params/      raw params          (orbax, sharded arrays)
  DIR/checkpoints/<step>/ema_params/  EMA params
  DIR/checkpoints/<step>/train_state/ step, optimizer state, reference norms, RNG (and, for
                                   tasks that have them, partner networks such as a GAN
                                   discriminator with their optimizer states, and the
                                   non-trained variables)
  DIR/checkpoints/<step>/data/        grain iterator state, one file per process

Orbax writes each step into a temporary directory and renames it when every item is complete,
so an interrupted save is never listed, let alone restored; temporary directories left by a
killed run are removed when the next run opens the workdir. Saves are asynchronous: a save that
fails (e.g. a full disk) raises `CheckpointSaveError` at the next step boundary, naming the OS
error and the last complete checkpoint, which it never touches; a save that would not fit in the
free disk space is refused before it starts.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import threading
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from tokenizers_jax import layer_stack
from tokenizers_jax.training.state import TrainState
from tokenizers_jax.training.workdir import load_config, save_config  # noqa: F401 (re-exported)

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "ema_params", "train_state", "data")


TEMPORARY_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; the checkpoints written before it are intact."""


def _manager(workdir: str, checkpoint_config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    keep = [policies.LatestN(n=checkpoint_config.keep)]
    if checkpoint_config.keep_every > 0:
        keep.append(policies.EveryNSteps(interval_steps=checkpoint_config.keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=bool(checkpoint_config.async_save),
        cleanup_tmp_directories=True,  # what a killed run left behind
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options, item_names=ITEMS
    )


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step in `workdir`, or None."""
    steps = ocp.utils.checkpoint_steps(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR))
    return max(steps) if steps else None


def _root_cause(error: BaseException) -> str:
    """The OS error behind a failed save (the first in its chain), else its first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, CheckpointSaveError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError  # unreachable


def _tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class Checkpointer:
    """Saves and restores TrainState + data iterator in `workdir/checkpoints` (all processes)."""

    def __init__(self, workdir: str, checkpoint_config: ml_collections.ConfigDict):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.manager = _manager(workdir, checkpoint_config)
        self._saving: int | None = None  # the step of the save in flight
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iterator: Any):
        """Starts an (async) save of `state` at its step; returns once the data state is taken.

        Raises:
          CheckpointSaveError: this save or the previous one failed, or it would not fit in the
            free disk space.
        """
        step = int(jax.device_get(state.step))
        self.wait_until_finished()  # the previous save, which orbax would wait for anyway
        self._check_free_space(step, _tree_bytes(state))
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    ema_params=ocp.args.StandardSave(state.ema_params),
                    train_state=ocp.args.StandardSave(_train_state_item(state)),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                ),
                force=True,
            )
        except Exception as e:  # pylint: disable=broad-exception-caught
            raise self._save_failed(e) from e
        logging.info("saving checkpoint at step %d", step)

    def _intact(self) -> str:
        steps = [s for s in ocp.utils.checkpoint_steps(self.directory) if s != self._saving]
        if steps:
            return f"the last complete checkpoint (step {max(steps)}) is intact"
        return "there is no complete checkpoint yet"

    def _save_failed(self, error: BaseException) -> CheckpointSaveError:
        self._failed = True
        return CheckpointSaveError(
            f"saving the checkpoint of step {self._saving} in {self.directory} failed: "
            f"{_root_cause(error)}. Training stopped; {self._intact()}. Fix the cause (e.g. "
            "free disk space) and re-run the same command to resume.")

    def _check_free_space(self, step: int, needed: int):
        """Refuses a save that cannot fit (measured on process 0, decided for every process)."""
        free = -1  # unknown (e.g. not a local filesystem): let the write decide
        if jax.process_index() == 0:
            try:
                free = shutil.disk_usage(self.directory).free
            except OSError:
                pass
        if jax.process_count() > 1:
            free = int(multihost_utils.broadcast_one_to_all(np.int64(free)))
        if 0 <= free < needed:
            self._saving = step
            raise self._save_failed(OSError(
                f"not enough free disk space: the checkpoint needs about "
                f"{_human_bytes(needed)}, {_human_bytes(free)} are free"))

    def check_for_errors(self):
        """Raises CheckpointSaveError if the async save in flight has failed; returns at once
        while it is still running (cheap: call it at every step)."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait_until_finished()  # finished: returns at once, or raises its error

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState,
                data_iterator: Any) -> TrainState:
        """Restores step `step` onto `shardings`; `data_iterator` is set to its saved position."""
        abstract = _abstract(abstract_state, shardings)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                ema_params=ocp.args.StandardRestore(abstract.ema_params),
                train_state=ocp.args.StandardRestore(_train_state_item(abstract)),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        logging.info("restored checkpoint at step %d from %s", step, self.workdir)
        return abstract_state.replace(
            params=restored.params, ema_params=restored.ema_params, **restored.train_state
        )

    def wait_until_finished(self):
        """Blocks until the save in flight is complete; raises CheckpointSaveError if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # pylint: disable=broad-exception-caught
            raise self._save_failed(e) from e
        self._saving = None

    def close(self):
        """Finishes the save in flight and releases the manager. Never raises (a failure is
        logged); removes the temporary directories of failed saves."""
        try:
            if not self._failed:
                self.wait_until_finished()
        except CheckpointSaveError as e:
            logging.error("%s", e)
        try:
            self.manager.close()
        except Exception:  # pylint: disable=broad-exception-caught
            pass  # a failure of the save in flight, reported above or by the caller
        if self._failed and jax.process_index() == 0:
            for path in glob.glob(os.path.join(self.directory, f"*{TEMPORARY_SUFFIX}*")):
                shutil.rmtree(path, ignore_errors=True)


# TrainState fields kept in the train_state item only when the task has them (a single-model
# task's checkpoints hold exactly step, opt_state, reference_norms and rng).
OPTIONAL_FIELDS = ("partner_params", "partner_opt_state", "variables")


def _train_state_item(state: TrainState) -> dict[str, Any]:
    item = dict(step=state.step, opt_state=state.opt_state,
                reference_norms=state.reference_norms, rng=state.rng)
    item.update({name: getattr(state, name) for name in OPTIONAL_FIELDS
                 if jax.tree.leaves(getattr(state, name))})
    return item


def _item_path(workdir: str, item: str, step: int | None) -> tuple[epath.Path, int]:
    """DIR/checkpoints/<step>/<item> of a complete step (default: the latest)."""
    workdir = os.path.abspath(os.fspath(workdir))
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {workdir}/{CHECKPOINT_DIR}")
    path = epath.Path(workdir) / CHECKPOINT_DIR / str(step) / item
    if not path.is_dir():
        raise FileNotFoundError(f"{workdir} has no complete checkpoint of step {step} with "
                                f"{item!r} (steps: {sorted(ocp.utils.checkpoint_steps(path.parent.parent))})")
    return path, step


def restore_params(workdir: str, abstract_params: Any, shardings: Any, item: str = "params",
                   step: int | None = None) -> Any:
    """Restores one params item ("params" or "ema_params") of a workdir onto `shardings`.

    Reads only that item's directory (the other items are not opened). Blocks saved in the
    other layout (stacked by `model.scan_layers`, or not) are converted to the target's.
    """
    path, step = _item_path(workdir, item, step)
    target = _abstract(abstract_params, shardings)
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(path)
        stored = layer_stack.match_layout(target, getattr(metadata, "tree", metadata))
        restored = handler.restore(path, args=ocp.args.StandardRestore(stored))
    finally:
        handler.close()
    if stored is not target:
        restored = jax.jit(lambda p: layer_stack.match_layout(p, target),
                           out_shardings=shardings)(restored)
    logging.info("restored %s of step %d from %s", item, step, workdir)
    return restored


def load_for_inference(workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, EMA params) of the latest checkpoint of a training workdir, on the default device.

    Works on any device count: the arrays are re-laid out when read.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config = load_config(workdir)
    path, step = _item_path(workdir, "ema_params", None)
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(path)
    finally:
        handler.close()
    tree = getattr(metadata, "tree", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, tree)
    return config, restore_params(workdir, tree, shardings, item="ema_params", step=step)


class PreemptionWatcher:
    """Tells, at each step boundary, whether the job was asked to stop (SIGTERM or SIGINT).

    A single process handles both signals itself: the first asks for a checkpoint at the next
    step boundary (the loop then stops with `stopped="preempted"`); a second SIGINT (Ctrl-C)
    aborts at once with KeyboardInterrupt. With several processes, jax.distributed's preemption
    service (which handles SIGTERM) agrees on a common step, and SIGINT keeps its default.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._stop = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name: str | None = None  # the signal that stopped the run
        if not self._multi_process:
            if threading.current_thread() is not threading.main_thread():
                logging.warning("not in the main thread: SIGTERM and SIGINT will not trigger a "
                                "checkpoint")
            else:
                for signum in self.SIGNALS:
                    self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self._stop.is_set():
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return
        self.signal_name = name
        again = " (Ctrl-C again aborts at once, without it)" if signum == signal.SIGINT else ""
        logging.warning("%s received: saving a checkpoint at the next step boundary%s", name,
                        again)
        self._stop.set()

    def reached(self, step: int) -> bool:
        if self._multi_process:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "SIGTERM"
                return True
            return False
        return self._stop.is_set()

    def close(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
