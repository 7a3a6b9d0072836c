"""Metric writing (process 0 only): JSON lines, TensorBoard event files, a console line, PNGs.

  DIR/metrics.jsonl     one {"step": s, name: value, ...} object per write
  DIR/tensorboard/      tensorboardX event files (scalars and images)
  DIR/images/<name>_<step>.png

A restarted training run passes `restart_step`: the rows after it are dropped from
metrics.jsonl (rewritten atomically) and TensorBoard hides the events after it, so each
(step, metric) appears once however often the run was restarted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging
from PIL import Image


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Tiles image batches into one picture: a row per batch.

    Args:
      rows: float [B, H, W, 3] batches in [-1, 1], all the same shape.
    Returns:
      uint8 [len(rows) * H, B * W, 3].
    """
    stacked = np.stack([np.asarray(r, np.float32) for r in rows])  # [R, B, H, W, 3]
    num_rows, batch, height, width, channels = stacked.shape
    grid = stacked.transpose(0, 2, 1, 3, 4).reshape(num_rows * height, batch * width, channels)
    return np.clip(np.round((grid + 1.0) * 127.5), 0, 255).astype(np.uint8)


def drop_rows_after(path: str, step: int):
    """Rewrites a metrics.jsonl without its rows of steps > `step` (atomically)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        if row_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        f.writelines(kept)
    os.replace(temporary, path)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricWriter:
    """Writes metrics on process 0; every method is a no-op on the other processes."""

    def __init__(self, workdir: str, total_steps: int, restart_step: int | None = None):
        """
        Args:
          restart_step: the step a run restarts from; rows and events after it are dropped
            (-1 drops all). None appends to what is there.
        """
        self.workdir = workdir
        self.total_steps = total_steps
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if restart_step is not None:
            drop_rows_after(path, restart_step)
        self._jsonl = open(path, "a")
        purge_step = None if restart_step is None else restart_step + 1
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                          purge_step=purge_step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        if not self.active:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def write_image(self, step: int, name: str, image: np.ndarray):
        """Saves uint8 [H, W, 3] as DIR/images/<name>_<step>.png and in TensorBoard."""
        if not self.active:
            return
        os.makedirs(os.path.join(self.workdir, "images"), exist_ok=True)
        Image.fromarray(image).save(os.path.join(self.workdir, "images", f"{name}_{step:08d}.png"))
        self._tensorboard.add_image(name, image, step, dataformats="HWC")
        self._tensorboard.flush()

    def console(self, step: int, scalars: Mapping[str, float], steps_per_second: float):
        """One progress line: step, percentage, chosen scalars, rate and ETA."""
        if not self.active:
            return
        eta = (self.total_steps - step) / steps_per_second if steps_per_second > 0 else math.inf
        values = " ".join(f"{name}={float(value):.4g}" for name, value in scalars.items())
        logging.info(
            "step %d/%d (%.1f%%) %s | %.2f steps/s | ETA %s",
            step, self.total_steps, 100.0 * step / max(self.total_steps, 1), values,
            steps_per_second, _format_duration(eta),
        )

    def close(self):
        if self.active:
            self._jsonl.close()
            self._tensorboard.close()
