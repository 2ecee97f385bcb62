"""One file = a JSON header + named numpy arrays, in an uncompressed zip, written atomically.

Used for the quantum graph and the generic workflow: loads in milliseconds per million rows and
holds no pickles (safe to read from an untrusted submit directory).
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npformat


def save_arrays(path: str | Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write header + arrays to a temporary name, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("header.json", json.dumps(header))
            for name, a in arrays.items():
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
                zf.writestr(f"{name}.npy", buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ArrayFileError(ValueError):
    """The file is not a readable header + arrays file: truncated, tampered with, or not ours."""


def _read_npy(data: bytes, name: str) -> np.ndarray:
    """One ``.npy`` member, its header checked against its size before anything is allocated (a
    tampered shape would otherwise make numpy allocate it, then fail or hang reading it)."""
    fp = io.BytesIO(data)
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp)
        else:
            raise ArrayFileError(f"array '{name}': unsupported .npy version {version}")
    except ArrayFileError:
        raise
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:
        raise ArrayFileError(f"array '{name}': bad header ({str(exc).splitlines()[0][:200]})") from None
    if dtype.hasobject:
        raise ArrayFileError(f"array '{name}': object arrays are not allowed")
    count = math.prod(shape)
    offset = fp.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ArrayFileError(f"array '{name}': {len(data) - offset} bytes of data for shape {tuple(shape)} "
                             f"of {dtype} ({count * dtype.itemsize} bytes): truncated or tampered")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return arr.copy()  # writable and owning its memory, as np.load's


def load_arrays(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a file written by :func:`save_arrays`. Raises OSError if it cannot be opened and
    :class:`ArrayFileError` (one line, no path: the caller names the file) if it is damaged."""
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                header = json.loads(zf.read("header.json"))
            except KeyError:
                raise ArrayFileError("no header") from None
            except ValueError as exc:  # JSON and UTF-8 errors
                raise ArrayFileError(f"bad header ({exc})") from None
            if not isinstance(header, dict):
                raise ArrayFileError("bad header (not a JSON object)")
            arrays = {
                info.filename[: -len(".npy")]: _read_npy(zf.read(info), info.filename[: -len(".npy")])
                for info in zf.infolist()
                if info.filename.endswith(".npy")
            }
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise ArrayFileError(f"not a readable array file ({exc or type(exc).__name__})") from None
    return header, arrays


# -- checks for loaders: vectorized, a few ms per million rows ----------------------------------------
def int_array(arrays: Mapping[str, np.ndarray], name: str, ndim: int = 1) -> np.ndarray:
    """``arrays[name]``, which must be an integer array of ``ndim`` dimensions."""
    a = arrays.get(name)
    if a is None:
        raise ArrayFileError(f"no array '{name}'")
    if a.dtype.kind not in "iu" or a.ndim != ndim:
        raise ArrayFileError(f"array '{name}': expected {ndim}-d integers, found {a.ndim}-d {a.dtype}")
    return a


def check_index(a: np.ndarray, limit: int, name: str, what: str) -> None:
    """Every value of ``a`` indexes something of ``limit`` (``what``: "quanta", "jobs", ...)."""
    if len(a) == 0:
        return
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= limit:
        bad = int(lo if lo < 0 else hi)
        raise ArrayFileError(f"array '{name}': index {bad} out of range (there are {limit} {what})")


def check_csr(ptr: np.ndarray, idx: np.ndarray, rows: int, targets: int, names: tuple[str, str], what: str,
              min_per_row: int = 0) -> None:
    """A CSR adjacency: ``rows + 1`` non-decreasing pointers from 0 to ``len(idx)`` (at least
    ``min_per_row`` apart), and indices into ``targets`` things."""
    pname, iname = names
    if len(ptr) != rows + 1:
        raise ArrayFileError(f"array '{pname}': {len(ptr)} entries, expected {rows + 1}")
    if ptr[0] != 0 or ptr[-1] != len(idx):
        raise ArrayFileError(f"array '{pname}': runs from {int(ptr[0])} to {int(ptr[-1])}, "
                             f"expected 0 to {len(idx)} (the length of '{iname}')")
    short = np.flatnonzero(np.diff(ptr) < min_per_row)
    if len(short):
        raise ArrayFileError(f"array '{pname}': row {int(short[0])} has {int(ptr[short[0] + 1] - ptr[short[0]])} "
                             f"entries (at least {min_per_row})")
    check_index(idx, targets, iname, what)
