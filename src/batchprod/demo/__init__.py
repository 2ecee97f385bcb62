"""The demo survey: synthetic sky images with injected point sources, a real 4-step pipeline.

``make_demo(dir)`` writes a data repository (registry + raw FITS + truth catalog), the pipeline YAML
and a submit YAML; ``check_catalog`` matches the final catalog against the injected sources.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from astropy.io import fits
from astropy.table import Table

from batchprod.demo.tasks import PATCH_MARGIN, PATCH_SIZE, PATCHES_PER_SIDE, patch_bbox
from batchprod.errors import RunError
from batchprod.execution.protocol import file_checksum

DETECTOR_SIZE = 160
DETECTOR_PITCH = 150
DITHER = 15
PSF_SIGMA = 1.5
NOISE = 5.0
SKY = 200.0
RAW_RUN = "raw/all"

PIPELINE = {
    "description": "batchprod demo: calibrate and detect per (visit, detector), coadd and measure per patch",
    "tasks": {
        "calibrate": {
            "python": "batchprod.demo.tasks:calibrate",
            "dimensions": ["visit", "detector"],
            "inputs": ["raw"],
            "outputs": ["calexp"],
        },
        "detect": {
            "python": "batchprod.demo.tasks:detect",
            "dimensions": ["visit", "detector"],
            "inputs": ["calexp"],
            "outputs": ["src"],
            "config": {"nSigma": 5.0},
        },
        "coadd": {
            "python": "batchprod.demo.tasks:coadd",
            "dimensions": ["tract", "patch"],
            "inputs": ["calexp"],
            "outputs": ["deepCoadd"],
        },
        "measure": {
            "python": "batchprod.demo.tasks:measure",
            "dimensions": ["tract", "patch"],
            "inputs": ["deepCoadd"],
            "outputs": ["objectTable"],
            "config": {"nSigma": 5.0},
        },
    },
}


def detector_origin(visit: int, detector: int, n_detectors: int) -> tuple[int, int]:
    """Sky origin of a detector in a visit: a grid of detectors shifted by a per-visit dither."""
    ncols = max(1, math.ceil(math.sqrt(n_detectors)))
    rng = np.random.default_rng(1000 + visit)
    dx, dy = (int(v) for v in rng.integers(-DITHER, DITHER + 1, size=2))
    return (detector % ncols) * DETECTOR_PITCH + dx, (detector // ncols) * DETECTOR_PITCH + dy


def _render(x0: int, y0: int, truth: Table, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:DETECTOR_SIZE, 0:DETECTOR_SIZE]
    img = np.full((DETECTOR_SIZE, DETECTOR_SIZE), SKY)
    for x, y, f in zip(truth["x"], truth["y"], truth["flux"], strict=True):
        lx, ly = x - x0, y - y0
        if -10 < lx < DETECTOR_SIZE + 10 and -10 < ly < DETECTOR_SIZE + 10:
            img += f / (2 * np.pi * PSF_SIGMA**2) * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * PSF_SIGMA**2))
    return img + rng.normal(0, NOISE, img.shape)


def make_demo(directory: str | Path, visits: int = 8, detectors: int = 5, n_sources: int = 40, seed: int = 42) -> Path:
    """Write repo, truth, pipeline and submit YAML under ``directory``; returns the submit YAML path."""
    from batchprod.execution.rundir import REGISTRY_FILE
    from batchprod.graph.registry import Registry

    d = Path(directory).resolve()
    repo = d / "repo"
    if (repo / REGISTRY_FILE).exists():
        raise RunError(f"{repo}: a demo repository already exists; choose another directory")
    (repo / RAW_RUN).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = PATCH_SIZE * PATCHES_PER_SIDE
    # Sources spread over the sky, kept apart so the check measures the pipeline, not blending.
    xs: list[float] = []
    ys: list[float] = []
    while len(xs) < n_sources:
        x, y = rng.uniform(15, side - 15, size=2)
        if all((x - a) ** 2 + (y - b) ** 2 > 15**2 for a, b in zip(xs, ys, strict=True)):
            xs.append(float(x))
            ys.append(float(y))
    truth = Table({"x": xs, "y": ys, "flux": rng.uniform(3000, 20000, size=n_sources)})
    truth.write(repo / "truth.fits", overwrite=True)

    reg = Registry(repo / REGISTRY_FILE, create=True)
    reg.register_dataset_type("raw", ["visit", "detector"])
    rows = []
    relations = []
    patches = [(0, p) for p in range(PATCHES_PER_SIDE**2)]
    for v in range(1, visits + 1):
        for det in range(detectors):
            x0, y0 = detector_origin(v, det, detectors)
            data = _render(x0, y0, truth, rng)
            bias, flat = 100.0 + 10 * det, 1.0 + 0.05 * (det - 1.5)
            hdu = fits.PrimaryHDU((data * flat + bias).astype(np.float32))
            hdu.header.update({"X0": x0, "Y0": y0, "BIAS": bias, "FLAT": flat, "VISIT": v, "DETECTOR": det})
            rel = f"{RAW_RUN}/raw_visit{v}_detector{det}.fits"
            hdu.writeto(repo / rel, overwrite=True)
            did = {"visit": v, "detector": det}
            rows.append((did, rel, (repo / rel).stat().st_size, file_checksum(repo / rel)))
            for tract, patch in patches:
                bx0, by0, bx1, by1 = patch_bbox(patch, PATCH_MARGIN)
                if x0 < bx1 and x0 + DETECTOR_SIZE > bx0 and y0 < by1 and y0 + DETECTOR_SIZE > by0:
                    relations.append((did, {"tract": tract, "patch": patch}))
    reg.insert_datasets("raw", RAW_RUN, rows)
    reg.insert_relations(["visit", "detector"], ["tract", "patch"], relations)
    reg.close()

    (d / "pipeline.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    submit = {
        "pipelineYaml": "pipeline.yaml",
        "payload": {"payloadName": "demo", "repo": "repo", "dataQuery": "", "outputRun": "demo/run{timestamp}"},
        "submitPath": str(d / "submit" / "{outputRun}"),
        "requestMemory": 512,
        "numberOfRetries": 1,
        "pipetask": {"coadd": {"requestMemory": 1024, "priority": 10}, "measure": {"priority": 10}},
        "finalJob": {"python": "batchprod.demo.tasks:merge_catalogs", "whenRun": "ALWAYS",
                     "outputs": ["final_catalog.fits"]},
    }
    (d / "submit.yaml").write_text(yaml.safe_dump(submit, sort_keys=False))
    (d / "demo.json").write_text(json.dumps({"visits": visits, "detectors": detectors, "sources": n_sources}))
    return d / "submit.yaml"


def check_catalog(directory: str | Path, run: Any, max_sep: float = 1.0, flux_tol: float = 0.1) -> dict[str, Any]:
    """Match the final catalog to the truth: recovered fraction, spurious objects, astrometry, photometry."""
    d = Path(directory).resolve()
    truth = Table.read(d / "repo" / "truth.fits")
    path = Path(run.workflow.run["repo"]) / run.workflow.run["output_run"] / "final_catalog.fits"
    if not path.is_file():
        return {"ok": False, "message": f"no final catalog at {path}"}
    cat = Table.read(path)
    tx, ty = np.asarray(truth["x"]), np.asarray(truth["y"])
    matched, seps, ferr = 0, [], []
    used = np.zeros(len(cat), dtype=bool)
    for x, y, f in zip(tx, ty, truth["flux"], strict=True):
        if len(cat) == 0:
            break
        dist = np.hypot(np.asarray(cat["x"]) - x, np.asarray(cat["y"]) - y)
        dist[used] = np.inf
        k = int(np.argmin(dist))
        if dist[k] <= max_sep:
            used[k] = True
            matched += 1
            seps.append(float(dist[k]))
            ferr.append(abs(float(cat["flux"][k]) / f - 1))
    spurious = int(len(cat) - used.sum())
    frac = matched / len(truth)
    med_flux = float(np.median(ferr)) if ferr else float("inf")
    ok = frac >= 0.95 and spurious <= max(1, len(truth) // 20) and med_flux <= flux_tol
    rms = float(np.sqrt(np.mean(np.square(seps)))) if seps else float("nan")
    msg = (f"{'PASS' if ok else 'FAIL'}: recovered {matched}/{len(truth)} injected sources, {spurious} spurious, "
           f"position rms {rms:.3f} px, median flux error {med_flux:.1%} ({path})")
    return {"ok": ok, "matched": matched, "truth": len(truth), "spurious": spurious, "rms_px": rms,
            "median_flux_error": med_flux, "message": msg}
