"""The demo pipeline's tasks: calibrate -> detect per (visit, detector); coadd -> measure per patch.

Images live on one flat sky plane in pixel units. A detector image carries its sky origin in the
FITS header (X0, Y0), plus its bias and flat-field gain, so each task is a real transformation of
real files and the final catalog can be checked against the injected truth.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from batchprod.pipeline.context import QuantumContext

PATCH_SIZE = 100  # sky pixels per patch side
PATCHES_PER_SIDE = 3
PATCH_MARGIN = 10  # coadds cover the patch plus this margin, so edge sources are measured whole
APERTURE = 5.0


def patch_bbox(patch: int, margin: int = 0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a patch on the sky, half-open, optionally grown by a margin."""
    px, py = patch % PATCHES_PER_SIDE, patch // PATCHES_PER_SIDE
    return (px * PATCH_SIZE - margin, py * PATCH_SIZE - margin,
            (px + 1) * PATCH_SIZE + margin, (py + 1) * PATCH_SIZE + margin)


def _write_fits(path: Path, hdu: fits.PrimaryHDU | fits.BinTableHDU) -> None:
    """Write to a temporary name and rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".part")
    hdu.writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _robust_sigma(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(1.4826 * np.median(np.abs(a - np.median(a)))) if a.size else 1.0


def _peaks(img: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Local maxima above threshold (3x3 neighbourhood), away from the border."""
    core = img[1:-1, 1:-1]
    ok = np.isfinite(core) & (core > threshold)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx or dy:
                nb = img[1 + dy : img.shape[0] - 1 + dy, 1 + dx : img.shape[1] - 1 + dx]
                ok &= core >= np.where(np.isfinite(nb), nb, -np.inf)
    ys, xs = np.nonzero(ok)
    return [(int(y) + 1, int(x) + 1) for y, x in zip(ys, xs, strict=True)]


def _measure(img: np.ndarray, y: int, x: int) -> tuple[float, float, float] | None:
    """Centroid (first moment, 5x5) and aperture flux around a peak; None if the aperture leaves the image."""
    r = int(np.ceil(APERTURE))
    if y - r < 0 or x - r < 0 or y + r + 1 > img.shape[0] or x + r + 1 > img.shape[1]:
        return None
    cut = img[y - 2 : y + 3, x - 2 : x + 3]
    if not np.all(np.isfinite(cut)):
        return None
    w = np.clip(cut, 0, None)
    yy, xx = np.mgrid[-2:3, -2:3]
    tot = w.sum()
    if tot <= 0:
        return None
    cy, cx = y + float((w * yy).sum() / tot), x + float((w * xx).sum() / tot)
    box = img[y - r : y + r + 1, x - r : x + r + 1]
    gy, gx = np.mgrid[-r : r + 1, -r : r + 1]
    mask = (gy + y - cy) ** 2 + (gx + x - cx) ** 2 <= APERTURE**2
    if not np.all(np.isfinite(box[mask])):
        return None
    return cx, cy, float(box[mask].sum())


def calibrate(ctx: QuantumContext) -> None:
    """Remove bias, divide by the flat and subtract the sky background."""
    raw = ctx.input("raw")
    with fits.open(raw.path) as hdul:
        hdr = hdul[0].header
        data = hdul[0].data.astype(np.float64)
    img = (data - hdr["BIAS"]) / hdr["FLAT"]
    img -= np.median(img)
    out = fits.PrimaryHDU(img.astype(np.float32))
    for k in ("X0", "Y0", "VISIT", "DETECTOR"):
        out.header[k] = hdr[k]
    out.header["BKGSIG"] = _robust_sigma(img)
    _write_fits(ctx.outputs["calexp"].path, out)


def detect(ctx: QuantumContext) -> None:
    """Single-image detection: peaks above nSigma x noise, measured, in sky coordinates."""
    with fits.open(ctx.input("calexp").path) as hdul:
        img = hdul[0].data.astype(np.float64)
        x0, y0, sig = hdul[0].header["X0"], hdul[0].header["Y0"], hdul[0].header["BKGSIG"]
    rows = []
    for y, x in _peaks(img, float(ctx.config.get("nSigma", 5.0)) * sig):
        m = _measure(img, y, x)
        if m:
            rows.append((m[0] + x0, m[1] + y0, m[2]))
    t = Table(rows=rows or None, names=("x", "y", "flux"), dtype=("f8", "f8", "f8"))
    _write_fits(ctx.outputs["src"].path, fits.BinTableHDU(t))


def coadd(ctx: QuantumContext) -> None:
    """Average every overlapping calibrated image onto the patch grid (integer dithers: exact)."""
    bx0, by0, bx1, by1 = patch_bbox(ctx.data_id["patch"], PATCH_MARGIN)
    acc = np.zeros((by1 - by0, bx1 - bx0))
    cnt = np.zeros_like(acc)
    for ref in ctx.inputs["calexp"]:
        with fits.open(ref.path) as hdul:
            img = hdul[0].data.astype(np.float64)
            x0, y0 = int(hdul[0].header["X0"]), int(hdul[0].header["Y0"])
        ix0, iy0 = max(bx0, x0), max(by0, y0)
        ix1, iy1 = min(bx1, x0 + img.shape[1]), min(by1, y0 + img.shape[0])
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        acc[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0] += img[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        cnt[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        co = np.where(cnt > 0, acc / cnt, np.nan)
    out = fits.PrimaryHDU(co.astype(np.float32))
    out.header["X0"], out.header["Y0"] = bx0, by0
    out.header["NINPUTS"] = len(ctx.inputs["calexp"])
    _write_fits(ctx.outputs["deepCoadd"].path, out)


def measure(ctx: QuantumContext) -> None:
    """Detect and measure on the coadd; keep sources whose centroid lies in the patch proper."""
    with fits.open(ctx.input("deepCoadd").path) as hdul:
        img = hdul[0].data.astype(np.float64)
        x0, y0 = hdul[0].header["X0"], hdul[0].header["Y0"]
    sig = _robust_sigma(img)
    px0, py0, px1, py1 = patch_bbox(ctx.data_id["patch"])
    rows = []
    for y, x in _peaks(img, float(ctx.config.get("nSigma", 5.0)) * sig):
        m = _measure(img, y, x)
        if m is None:
            continue
        sx, sy = m[0] + x0, m[1] + y0
        if px0 <= sx < px1 and py0 <= sy < py1:
            rows.append((sx, sy, m[2], ctx.data_id["tract"], ctx.data_id["patch"]))
    t = Table(rows=rows or None, names=("x", "y", "flux", "tract", "patch"), dtype=("f8", "f8", "f8", "i8", "i8"))
    _write_fits(ctx.outputs["objectTable"].path, fits.BinTableHDU(t))


def merge_catalogs(spec: dict[str, Any]) -> None:
    """Final job: merge every patch catalog of the run into one catalog."""
    root = Path(spec["repo"]) / spec["output_run"]
    files = sorted(glob.glob(str(root / "objectTable" / "*.fits")))
    tables = [Table.read(f) for f in files]
    rows = [tuple(r) for t in tables for r in t]
    merged = Table(rows=rows or None, names=("x", "y", "flux", "tract", "patch"),
                   dtype=("f8", "f8", "f8", "i8", "i8"))
    merged.meta["NFILES"] = len(files)
    _write_fits(root / "final_catalog.fits", fits.BinTableHDU(merged))
    print(f"merged {len(merged)} objects from {len(files)} patch catalogs")
