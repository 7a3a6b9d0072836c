"""The ADM evaluator's .npz batches, streamed: written and read a batch at a time.

A sample batch (what `python -m tokenizers_jax.sample` writes, and the ADM evaluator
`evaluations/evaluator.py` of openai/guided-diffusion reads) is an uncompressed .npz with
  arr_0   uint8 [N, H, W, 3] images
  arr_1   int [N] class labels (optional; ADM's class-conditional samplers write them)
A reference batch (`VIRTUAL_imagenet256_labeled.npz`) also holds statistics; see
`generation_evaluation`. At 256 px, 50,000 images are 9.8 GB, so arrays are written from and
read into batches instead of being held in memory.
"""

from __future__ import annotations

import os
import zipfile
from typing import Iterable, Iterator

import numpy as np


def write_npz(path: str | os.PathLike, arrays: dict[str, tuple[tuple[int, ...], np.dtype,
                                                                Iterable[np.ndarray]]]):
    """Writes an uncompressed .npz (as `np.savez`) whose arrays arrive in pieces.

    Args:
      arrays: name -> (shape, dtype, pieces): the pieces, C-ordered, concatenate along axis 0
        to exactly `shape`. Written under `path` + ".tmp", renamed when complete.
    """
    path = os.fspath(path)
    temporary = f"{path}.tmp"
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, (shape, dtype, pieces) in arrays.items():
            dtype = np.dtype(dtype)
            expected = int(np.prod(shape)) * dtype.itemsize
            written = 0
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, dict(
                    descr=np.lib.format.dtype_to_descr(dtype), fortran_order=False,
                    shape=tuple(shape)))
                for piece in pieces:
                    data = np.ascontiguousarray(piece, dtype).tobytes()
                    f.write(data)
                    written += len(data)
            if written != expected:
                raise ValueError(f"{name}: got {written} bytes for shape {tuple(shape)} "
                                 f"{dtype}, expected {expected}")
    os.replace(temporary, path)


def _open_member(archive: zipfile.ZipFile, path: str, name: str):
    member = f"{name}.npy"
    if member not in archive.namelist():
        keys = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise KeyError(f"{path} has no array {name!r}; it holds {keys}")
    return archive.open(member)


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran_order, dtype = read(f)
    if fortran_order or dtype.hasobject:
        raise ValueError("expected a C-ordered array of plain numbers")
    return shape, dtype


def array_shape(path: str | os.PathLike, name: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of a .npz, read from its header only."""
    path = os.fspath(path)
    with zipfile.ZipFile(path) as archive, _open_member(archive, path, name) as f:
        return _read_header(f)


def read_batches(path: str | os.PathLike, batch_size: int, name: str = "arr_0"
                 ) -> Iterator[np.ndarray]:
    """Consecutive [<= batch_size, ...] slices of one array of a .npz, read from disk as
    needed."""
    path = os.fspath(path)
    with zipfile.ZipFile(path) as archive, _open_member(archive, path, name) as f:
        shape, dtype = _read_header(f)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ValueError(f"{path}: {name} is truncated at row {start}")
            yield np.frombuffer(data, dtype).reshape(count, *shape[1:])
