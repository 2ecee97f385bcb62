"""Synthetic quantum graphs of any size, built with numpy, for benchmarks and scale tests.

Shape (like a survey's DRP): ``isr`` and ``calibrate`` per (visit, detector), ``coadd`` per (tract,
patch) gathering every calibrated image that overlaps it (each image overlaps ``overlap`` patches),
``measure`` per (tract, patch). Registry inputs: one ``raw`` per isr quantum.
"""

from __future__ import annotations

import numpy as np

from batchprod.graph.quantum_graph import QuantumGraph, TaskNode

TASKS = [
    TaskNode("isr", ("visit", "detector"), ("raw",), ("postIsr",), command="true"),
    TaskNode("calibrate", ("visit", "detector"), ("postIsr",), ("calexp",), command="true"),
    TaskNode("coadd", ("tract", "patch"), ("calexp",), ("deepCoadd",), command="true"),
    TaskNode("measure", ("tract", "patch"), ("deepCoadd",), ("objectTable",), command="true"),
]


def synthetic_graph(n_quanta: int, detectors: int = 189, overlap: int = 2, images_per_patch: int = 40) -> QuantumGraph:
    """A graph of about ``n_quanta`` quanta (exact count depends on rounding)."""
    # n = 2 * n_vd + 2 * n_patch with n_patch = n_vd * overlap / images_per_patch
    n_vd = max(detectors, int(n_quanta / (2 + 2 * overlap / images_per_patch)))
    visits = max(1, n_vd // detectors)
    n_vd = visits * detectors
    n_patch = max(1, n_vd * overlap // images_per_patch)
    vd = np.stack([np.repeat(np.arange(visits), detectors), np.tile(np.arange(detectors), visits)], axis=1)
    patches_per_tract = 100
    tp = np.stack([np.arange(n_patch) // patches_per_tract, np.arange(n_patch) % patches_per_tract], axis=1)

    isr0, cal0, co0, me0 = 0, n_vd, 2 * n_vd, 2 * n_vd + n_patch
    n = 2 * n_vd + 2 * n_patch
    # calexp i overlaps patches (i * overlap + k) // images_per_patch * ... spread evenly:
    img = np.repeat(np.arange(n_vd), overlap)
    patch = (np.arange(n_vd * overlap) // images_per_patch) % n_patch
    # predecessor lists in CSR, per consumer quantum
    counts = np.zeros(n, dtype=np.int64)
    counts[cal0:co0] = 1
    counts[co0:me0] = np.bincount(patch, minlength=n_patch)
    counts[me0:] = 1
    pred_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=pred_ptr[1:])
    order = np.argsort(patch, kind="stable")
    pred_idx = np.concatenate([
        np.arange(isr0, cal0),  # calibrate <- isr
        cal0 + img[order],  # coadd <- calibrate (fan-in)
        np.arange(co0, me0),  # measure <- coadd
    ]).astype(np.int32)
    ext_ptr = np.zeros(n + 1, dtype=np.int64)
    ext_ptr[1 : n_vd + 1] = np.arange(1, n_vd + 1)
    ext_ptr[n_vd + 1 :] = n_vd
    ext_idx = np.arange(n_vd, dtype=np.int64)
    ext = [("raw", f'{{"detector":{d},"visit":{v}}}', f"raw/raw_{v}_{d}.fits", None) for v, d in vd.tolist()]
    offsets = np.array([isr0, cal0, co0, me0, n])
    return QuantumGraph(TASKS, offsets, [vd, vd, tp, tp], pred_ptr, pred_idx, ext_ptr, ext_idx, ext,
                        {"synthetic": True})
