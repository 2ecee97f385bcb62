"""The quantum graph in compact, array-backed form.

Quanta are integer indices, grouped by task in topological order. Data IDs live in one int64 column
block per task; dependencies are a CSR adjacency (predecessor pointers + indices). No Python object
per node or edge, so 10^6 quanta cost tens of MB and traverse in well under a second.

Dimension values are integers, or strings through a **vocabulary** per dimension (``vocab``: the
sorted distinct values; the column holds their codes), so that ``instrument='Cam'`` costs 8 bytes a
quantum and codes sort as the strings do. A graph converted from another system keeps that system's
node ids (``external_ids``: 16 bytes per quantum, e.g. Rubin's quantum UUIDs), found again by binary
search over a sorted permutation (O(log n)).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from batchprod._arrayfile import ArrayFileError, check_csr, int_array, load_arrays, save_arrays
from batchprod.errors import GraphError
from batchprod.graph.registry import canonical

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaskNode:
    """What the graph keeps of a pipeline task."""

    label: str
    dimensions: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    python: str | None = None
    command: str | None = None
    config: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "dimensions": list(self.dimensions),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "python": self.python,
            "command": self.command,
            "config": self.config or {},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskNode:
        return cls(
            d["label"],
            tuple(d["dimensions"]),
            tuple(d["inputs"]),
            tuple(d["outputs"]),
            d.get("python"),
            d.get("command"),
            d.get("config") or {},
        )


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a quantum reads or writes: type, data ID and where it lives."""

    dataset_type: str
    data_id: dict[str, Any]
    path: str
    checksum: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for job specs (dataclasses.asdict deep-copies and is ~10x slower)."""
        return {"dataset_type": self.dataset_type, "data_id": self.data_id, "path": self.path,
                "checksum": self.checksum}


def dataset_filename(dataset_type: str, data_id: dict[str, Any]) -> str:
    """File name of a produced dataset inside ``<repo>/<run>/<type>/`` (readable, unique per data ID)."""
    parts = "_".join(f"{k}{v}" for k, v in data_id.items())
    return f"{dataset_type}_{parts}.fits" if parts else f"{dataset_type}.fits"


class QuantumGraph:
    """Quanta (task x data ID) with dependency edges and their registry inputs."""

    def __init__(
        self,
        tasks: Sequence[TaskNode],
        task_offsets: np.ndarray,
        data_ids: Sequence[np.ndarray],
        pred_ptr: np.ndarray,
        pred_idx: np.ndarray,
        ext_ptr: np.ndarray,
        ext_idx: np.ndarray,
        ext_datasets: Sequence[tuple[str, str, str, str | None]],
        metadata: dict[str, Any] | None = None,
        vocab: dict[str, Sequence[str]] | None = None,
        external_ids: np.ndarray | None = None,
    ) -> None:
        self.tasks = list(tasks)
        #: string dimensions: dimension -> sorted distinct values (the data ID columns hold codes)
        self.vocab = {d: list(v) for d, v in (vocab or {}).items()}
        #: the quanta's ids in the system the graph came from (n x 16 bytes), or None
        self.task_offsets = np.asarray(task_offsets, dtype=np.int64)
        self.data_ids = [np.asarray(a, dtype=np.int64).reshape(-1, len(t.dimensions)) for a, t in zip(data_ids, self.tasks, strict=True)]
        self.pred_ptr = np.asarray(pred_ptr, dtype=np.int64)
        self.pred_idx = np.asarray(pred_idx, dtype=np.int32)
        self.ext_ptr = np.asarray(ext_ptr, dtype=np.int64)
        self.ext_idx = np.asarray(ext_idx, dtype=np.int64)
        #: registry inputs: (dataset type, canonical data ID JSON, location, checksum)
        self.ext_datasets = list(ext_datasets)
        self.metadata = dict(metadata or {})
        self._label_index = {t.label: i for i, t in enumerate(self.tasks)}
        n = int(self.task_offsets[-1])
        if len(self.pred_ptr) != n + 1 or len(self.ext_ptr) != n + 1:
            raise GraphError("quantum graph arrays are inconsistent (corrupt file?)")
        self.external_ids = None if external_ids is None else np.ascontiguousarray(external_ids, dtype=np.uint8)
        if self.external_ids is not None and self.external_ids.shape != (n, 16):
            raise GraphError("quantum graph: external ids are not 16 bytes per quantum")
        #: per task, (column, vocabulary) of its string dimensions
        self._decode = [[(i, self.vocab[d]) for i, d in enumerate(t.dimensions) if d in self.vocab]
                        for t in self.tasks]

    # -- sizes and lookups --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.task_offsets[-1])

    @property
    def n_edges(self) -> int:
        return len(self.pred_idx)

    @cached_property
    def task_of(self) -> np.ndarray:
        """Task index of every quantum (int16)."""
        counts = np.diff(self.task_offsets)
        return np.repeat(np.arange(len(self.tasks), dtype=np.int16), counts)

    def task_index(self, label: str) -> int:
        return self._label_index[label]

    def quanta_of(self, label: str) -> range:
        t = self._label_index[label]
        return range(int(self.task_offsets[t]), int(self.task_offsets[t + 1]))

    def counts(self) -> dict[str, int]:
        return {t.label: int(self.task_offsets[i + 1] - self.task_offsets[i]) for i, t in enumerate(self.tasks)}

    def label(self, q: int) -> str:
        return self.tasks[int(self.task_of[q])].label

    def data_id(self, q: int) -> dict[str, Any]:
        t = int(self.task_of[q])
        row = self.data_ids[t][q - int(self.task_offsets[t])].tolist()  # Python ints at once, not per value
        if self.vocab:
            for i, words in self._decode[t]:
                row[i] = words[row[i]]
        return dict(zip(self.tasks[t].dimensions, row, strict=True))

    def decode(self, dim: str, codes: list[int]) -> list[Any]:
        """Values of one dimension's column entries (strings for a vocabulary dimension)."""
        words = self.vocab.get(dim)
        return codes if words is None else [words[c] for c in codes]

    # -- ids of another system ----------------------------------------------------------------------
    @cached_property
    def _ext_sorted(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.external_ids is not None
        keys = self.external_ids.view(np.dtype((np.void, 16))).ravel()
        order = np.argsort(keys, kind="stable")
        return keys[order], order

    def external_id(self, q: int) -> str | None:
        """The quantum's id in the system the graph came from (a UUID, as its 32 hex digits)."""
        return None if self.external_ids is None else self.external_ids[q].tobytes().hex()

    def quantum_of(self, external_id: str | bytes) -> int:
        """The quantum with that external id (UUID string, hex or 16 bytes); GraphError if none."""
        if self.external_ids is None:
            raise GraphError("this quantum graph has no external node ids")
        raw = external_id if isinstance(external_id, bytes) else bytes.fromhex(str(external_id).replace("-", ""))
        if len(raw) != 16:
            raise GraphError(f"not a 16-byte node id: {external_id!r}")
        keys, order = self._ext_sorted
        key = np.frombuffer(raw, dtype=np.dtype((np.void, 16)))[0]
        i = int(np.searchsorted(keys, key))
        if i == len(keys) or keys[i] != key:
            raise GraphError(f"no quantum with node id {external_id}")
        return int(order[i])

    def node_id(self, q: int) -> str:
        """Stable id: the quantum's id in the system its graph came from (a Rubin UUID, as text),
        else a hash of label + data ID, so a re-plan and a restart agree on identity."""
        if self.external_ids is not None:
            return uuid_text(self.external_ids[q].tobytes().hex())
        return hashlib.blake2b(
            f"{self.label(q)}:{canonical(self.data_id(q))}".encode(), digest_size=8
        ).hexdigest()

    def predecessors(self, q: int) -> np.ndarray:
        return self.pred_idx[self.pred_ptr[q] : self.pred_ptr[q + 1]]

    @cached_property
    def _succ(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        src = np.repeat(np.arange(n, dtype=np.int32), np.diff(self.pred_ptr))  # consumer per edge
        order = np.argsort(self.pred_idx, kind="stable")
        succ_idx = src[order]
        counts = np.bincount(self.pred_idx, minlength=n)
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        return ptr, succ_idx

    def successors(self, q: int) -> np.ndarray:
        ptr, idx = self._succ
        return idx[ptr[q] : ptr[q + 1]]

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """All edges as (producer, consumer) index arrays."""
        consumer = np.repeat(np.arange(len(self), dtype=np.int32), np.diff(self.pred_ptr))
        return self.pred_idx, consumer

    # -- per-quantum datasets -----------------------------------------------------------------------
    def outputs(self, q: int, repo: str | Path, run: str) -> list[DatasetRef]:
        task = self.tasks[int(self.task_of[q])]
        did = self.data_id(q)
        base = os.path.join(str(repo), run)  # string joins: this runs once per quantum per launch
        return [DatasetRef(dt, did, os.path.join(base, dt, dataset_filename(dt, did))) for dt in task.outputs]

    def inputs(self, q: int, repo: str | Path, run: str) -> list[DatasetRef]:
        task = self.tasks[int(self.task_of[q])]
        wanted = set(task.inputs)
        refs: list[DatasetRef] = []
        for p in self.predecessors(q):
            refs.extend(r for r in self.outputs(int(p), repo, run) if r.dataset_type in wanted)
        refs.extend(self.registry_inputs(q, repo))
        return refs

    def registry_inputs(self, q: int, repo: str | Path) -> list[DatasetRef]:
        """The inputs of quantum q that come from the registry (not from another quantum)."""
        refs = []
        for e in self.ext_idx[self.ext_ptr[q] : self.ext_ptr[q + 1]]:
            dt, did, loc, ck = self.ext_datasets[int(e)]
            try:
                path = loc if os.path.isabs(loc) else os.path.join(str(repo), loc)
                refs.append(DatasetRef(dt, json.loads(did), path, ck))
            except (TypeError, ValueError):
                raise GraphError(f"quantum graph: registry input {int(e)} ({dt!r}) is damaged") from None
        return refs

    # -- checks -------------------------------------------------------------------------------------
    def topological_order(self) -> np.ndarray:
        """Kahn's algorithm over the CSR arrays; raises GraphError on a cycle."""
        n = len(self)
        indeg = np.diff(self.pred_ptr).astype(np.int64)
        ptr, succ = self._succ
        ready = list(np.flatnonzero(indeg == 0))
        order = np.empty(n, dtype=np.int64)
        k = 0
        indeg_l = indeg.tolist()
        ptr_l = ptr.tolist()
        succ_l = succ.tolist()
        while ready:
            q = ready.pop()
            order[k] = q
            k += 1
            for s in succ_l[ptr_l[q] : ptr_l[q + 1]]:
                indeg_l[s] -= 1
                if indeg_l[s] == 0:
                    ready.append(s)
        if k != n:
            raise GraphError(f"quantum graph has a cycle ({n - k} quanta on or behind it)")
        return order

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        header = {
            "format": "batchprod-qgraph",
            "version": FORMAT_VERSION,
            "tasks": [t.to_json() for t in self.tasks],
            "ext_datasets": self.ext_datasets,
            "metadata": self.metadata,
            "vocab": self.vocab,
        }
        arrays: dict[str, np.ndarray] = {
            "task_offsets": self.task_offsets,
            "pred_ptr": self.pred_ptr,
            "pred_idx": self.pred_idx,
            "ext_ptr": self.ext_ptr,
            "ext_idx": self.ext_idx,
        }
        for i, a in enumerate(self.data_ids):
            arrays[f"data_ids_{i}"] = a
        if self.external_ids is not None:
            arrays["external_ids"] = self.external_ids
        save_arrays(path, header, arrays)

    @classmethod
    def load(cls, path: str | Path) -> QuantumGraph:
        """Read a graph file; a damaged or tampered one (truncated arrays, indices out of range, a
        bad header) is one GraphError naming the file. The checks are vectorized: ~25 ms at 10^6 quanta."""
        path = Path(path)
        if not path.is_file():
            raise GraphError(f"{path}: quantum graph file not found")
        try:
            header, arr = load_arrays(path)
        except OSError as exc:
            raise GraphError(f"{path}: cannot read quantum graph: {exc.strerror or exc}") from None
        except ArrayFileError as exc:
            raise GraphError(f"{path}: cannot read quantum graph: {exc}") from None
        if header.get("format") != "batchprod-qgraph":
            raise GraphError(f"{path}: not a batchprod quantum graph")
        if header.get("version") != FORMAT_VERSION:
            raise GraphError(f"{path}: unsupported graph format version {header.get('version')}")
        try:
            tasks = [_task_from_header(t) for t in header["tasks"]]
            ext = [tuple(x) for x in header["ext_datasets"]]
            metadata = header.get("metadata")
            if not isinstance(metadata, dict | None) or not set(map(len, ext)) <= {4}:
                raise ArrayFileError("bad header (metadata or registry inputs)")
            data_ids = _check_arrays(tasks, arr, len(ext))
            vocab = _check_vocab(header.get("vocab") or {}, tasks, data_ids)
        except ArrayFileError as exc:
            raise GraphError(f"{path}: damaged quantum graph: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GraphError(f"{path}: damaged quantum graph: bad header ({type(exc).__name__}: {exc})") from None
        try:
            return cls(tasks, arr["task_offsets"], data_ids, arr["pred_ptr"], arr["pred_idx"], arr["ext_ptr"],
                       arr["ext_idx"], ext, metadata, vocab, arr.get("external_ids"))
        except GraphError as exc:
            raise GraphError(f"{path}: damaged quantum graph: {exc}") from None


def vocabulary(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(sorted distinct values, their codes for ``values``): a string dimension's column."""
    words, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return words.tolist(), codes.astype(np.int64)


def _check_vocab(vocab: Any, tasks: list[TaskNode], data_ids: list[np.ndarray]) -> dict[str, list[str]]:
    """A file's vocabularies: strings, sorted, and every code of their columns in range."""
    if not isinstance(vocab, dict):
        raise ArrayFileError("bad header (vocab)")
    for d, words in vocab.items():
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or words != sorted(set(words)):
            raise ArrayFileError(f"bad header (vocab of {d!r})")
        for t, a in zip(tasks, data_ids, strict=True):
            if d in t.dimensions and len(a):
                col = a[:, t.dimensions.index(d)]
                if col.min() < 0 or col.max() >= len(words):
                    raise ArrayFileError(f"dimension {d!r} of task {t.label!r}: code out of its vocabulary")
    return vocab


def _task_from_header(d: Any) -> TaskNode:
    t = TaskNode.from_json(d)
    names = [t.label, *t.dimensions, *t.inputs, *t.outputs]
    if not all(isinstance(x, str) for x in names) or not all(isinstance(x, str | None) for x in (t.python, t.command)) \
            or not isinstance(t.config, dict):
        raise ArrayFileError(f"bad header (task {t.label!r})")
    return t


def _check_arrays(tasks: list[TaskNode], arr: dict[str, np.ndarray], n_ext: int) -> list[np.ndarray]:
    """Sizes and index ranges of a loaded graph's arrays (raises ArrayFileError); the data ID blocks."""
    if len({t.label for t in tasks}) != len(tasks):
        raise ArrayFileError("bad header (a task label appears twice)")
    offsets = int_array(arr, "task_offsets")
    if len(offsets) != len(tasks) + 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise ArrayFileError(f"array 'task_offsets': not {len(tasks) + 1} non-decreasing offsets from 0")
    n = int(offsets[-1])
    if n >= 2**31:
        raise ArrayFileError(f"array 'task_offsets': {n} quanta")
    data_ids = []
    for i, t in enumerate(tasks):
        a = arr.get(f"data_ids_{i}")
        if a is None or a.dtype.kind not in "iu":
            raise ArrayFileError(f"array 'data_ids_{i}': missing or not integers")
        count = int(offsets[i + 1] - offsets[i])
        if a.size != count * len(t.dimensions) or (t.dimensions and a.ndim != 2):
            raise ArrayFileError(f"array 'data_ids_{i}': shape {a.shape}, expected ({count}, {len(t.dimensions)}) "
                                 f"for task '{t.label}'")
        data_ids.append(a)
    pred_ptr, pred_idx = int_array(arr, "pred_ptr"), int_array(arr, "pred_idx")
    check_csr(pred_ptr, pred_idx, n, n, ("pred_ptr", "pred_idx"), "quanta")
    # quanta are numbered in dependency order: every producer before its consumer (so no cycle)
    consumer = np.repeat(np.arange(n, dtype=np.int64), np.diff(pred_ptr))
    later = np.flatnonzero(pred_idx >= consumer)
    if len(later):
        raise ArrayFileError(f"array 'pred_idx': quantum {int(consumer[later[0]])} depends on quantum "
                             f"{int(pred_idx[later[0]])}, which does not come before it")
    check_csr(int_array(arr, "ext_ptr"), int_array(arr, "ext_idx"), n, n_ext, ("ext_ptr", "ext_idx"),
              "registry inputs")
    return data_ids


def uuid_text(hex32: str) -> str:
    """32 hex digits as a UUID's usual text (8-4-4-4-12), as pipetask and ctrl_bps write it."""
    h = hex32
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" if len(h) == 32 else h
