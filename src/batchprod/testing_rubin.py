"""Rubin test helpers: a real Butler repository (sqlite), pipelines of pipe_base mock tasks, real graphs.

Needs the extra ``batchprod[rubin]``; lsst code is imported inside the functions only. Used by the
tests and by ``bench/rubin_prepare.py``.

A task made to fail that can be *fixed* without a new graph (a graph bakes its tasks' config in, as
a real one does; a real fix is in code): :func:`write_fixable_task` writes a module ``bpfix`` whose
task fails on its ``fail_condition`` only while a ``FAIL`` file lies next to it (``fix()`` removes it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

MOCK = "lsst.pipe.base.tests.mocks.DynamicTestPipelineTask"
FIXABLE = "bpfix.FixableTask"


def rubin_repo(root: Path, detectors: int, visits: int = 0) -> Path:
    """A Butler repo with instrument Cam, its detectors (and visits), one mock input ``raw_in`` per
    data ID in RUN 'inputs'."""
    from lsst.daf.butler import Butler, DatasetRef, DatasetType
    from lsst.pipe.base.tests.mocks import MockDataset, MockStorageClass

    repo = root / "repo"
    Butler.makeRepo(str(repo))
    with Butler.from_config(str(repo), writeable=True) as butler:
        reg = butler.registry
        reg.insertDimensionData("instrument", {
            "name": "Cam", "detector_max": 1000, "visit_max": 100000, "exposure_max": 100000, "visit_system": 0,
            "class_name": "unused.Cam"})
        reg.insertDimensionData("detector", *[{"instrument": "Cam", "id": d, "full_name": f"D{d}"}
                                              for d in range(detectors)])
        dims = ["instrument", "detector"]
        if visits:
            reg.insertDimensionData("physical_filter", {"instrument": "Cam", "name": "r1", "band": "r"})
            reg.insertDimensionData("day_obs", {"instrument": "Cam", "id": 20260101})
            reg.insertDimensionData("visit", *[{"instrument": "Cam", "id": v, "name": f"v{v}", "day_obs": 20260101,
                                                "physical_filter": "r1"} for v in range(visits)])
            reg.insertDimensionData("visit_detector_region", *[{"instrument": "Cam", "visit": v, "detector": d}
                                                               for v in range(visits) for d in range(detectors)])
            dims.append("visit")
        dt = DatasetType("raw_in", dims, MockStorageClass.get_or_register_mock("StructuredDataDict"),
                         universe=butler.dimensions)
        reg.registerDatasetType(dt)
        butler.collections.register("inputs")
        refs = [DatasetRef(dt, reg.expandDataId(d), run="inputs") for d in butler.query_data_ids(dims, explain=False)]
        for ref in refs:
            butler.put(MockDataset(dataset_id=ref.id, dataset_type=dt.to_simple(), data_id=dict(ref.dataId.mapping),
                                   run="inputs"), ref)
    return repo


def task_yaml(label: str, in_dims: Sequence[str], inp: str, out: str, out_dims: Sequence[str],
              multiple: bool = False, cls: str = MOCK, fail: str | None = None) -> str:
    """One pipeline task of a mock pipeline (YAML text): ``inp`` -> ``out`` over ``out_dims``."""
    body = ("from lsst.pipe.base.tests.mocks import DynamicConnectionConfig\n"
            f"config.dimensions = {list(out_dims)}\n"
            f'config.inputs["input"] = DynamicConnectionConfig(dataset_type_name="{inp}", '
            f"dimensions={list(in_dims)}, multiple={multiple})\n"
            f'config.outputs["output"] = DynamicConnectionConfig(dataset_type_name="{out}", '
            f"dimensions={list(out_dims)})\n"
            + (f'config.fail_condition = "{fail}"\n' if fail else ""))
    return f"  {label}:\n    class: {cls}\n    config:\n      python: |\n" + textwrap.indent(body, " " * 8)


def fan_in_pipeline(path: Path, fail: str | None = None) -> Path:
    """a, b per (instrument, detector); c gathers every b of the instrument. ``fail``: a condition on
    which b fails (while its FAIL file exists, see :func:`write_fixable_task`)."""
    d = ["instrument", "detector"]
    path.write_text("description: mock a -> b -> c\ntasks:\n" + task_yaml("a", d, "raw_in", "a_out", d)
                    + task_yaml("b", d, "a_out", "b_out", d, cls=FIXABLE if fail else MOCK, fail=fail)
                    + task_yaml("c", d, "b_out", "c_out", ["instrument"], multiple=True))
    return path


def write_fixable_task(directory: Path) -> Path:
    """``bpfix.py`` in ``directory`` (put it on PYTHONPATH) and its ``FAIL`` switch; returns the switch."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bpfix.py").write_text(textwrap.dedent('''\
        """A mock task whose fail_condition holds only while FAIL lies next to this file (a fixable bug)."""
        import os

        from lsst.pipe.base.tests.mocks import DynamicTestPipelineTask

        FAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "FAIL")


        class FixableTask(DynamicTestPipelineTask):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                if not os.path.exists(FAIL):
                    self.data_id_match = None
        '''))
    switch = directory / "FAIL"
    switch.write_text("remove me to fix the task\n")
    return switch


def tool(name: str) -> str:
    """A Rubin command-line tool (pipetask, butler) of this Python's environment."""
    return str(Path(sys.executable).parent / name)


def make_qgraph(repo: Path, pipeline: Path, out: Path, output_run: str = "u/test/out/run1",
                extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Path:
    """``pipetask qgraph`` of ``pipeline`` over the repo's inputs into ``out`` (a ``.qg``)."""
    p = subprocess.run([tool("pipetask"), "qgraph", "-b", str(repo), "-p", str(pipeline), "-i", "inputs",
                        "-o", output_run.rsplit("/", 1)[0], "--output-run", output_run,
                        "--qgraph-datastore-records", "--save-qgraph", str(out), *extra],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"pipetask qgraph failed: {p.stderr[-2000:]}")
    return out


def query_datasets(repo: Path, dataset_type: str, collection: str) -> list[str]:
    """``butler query-datasets REPO TYPE --collections C``: the data rows it prints (one per dataset)."""
    p = subprocess.run([tool("butler"), "query-datasets", str(repo), dataset_type, "--collections", collection],
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        if "EmptyQueryResultError" in p.stderr:  # none of them (the tool says so by failing)
            return []
        raise RuntimeError(f"butler query-datasets failed: {p.stderr[-2000:]}")
    return [ln for ln in p.stdout.splitlines() if ln.strip() and dataset_type in ln.split()]


def chain_pipeline(path: Path, chain: int = 5) -> Path:
    """t1 .. t<chain> per (instrument, visit, detector), chained; t<chain+1> gathers the last per visit
    (a 6-label pipeline over two dimensions by default: the benchmark's)."""
    vd = ["instrument", "visit", "detector"]
    text = "description: mock chain + per-visit gather\ntasks:\n"
    prev = "raw_in"
    for i in range(1, chain + 1):
        text += task_yaml(f"t{i}", vd, prev, f"t{i}_out", vd)
        prev = f"t{i}_out"
    text += task_yaml(f"t{chain + 1}", vd, prev, f"t{chain + 1}_out", ["instrument", "visit"], multiple=True)
    path.write_text(text)
    return path
