"""Property-based fuzzing of the submit-config and pipeline loaders (issue 8).

Mutations of a valid config and pipeline — random values of random types at random keys, random
bytes, deep nesting, aliases, huge numbers, NUL bytes, non-UTF-8, bad overrides — must either load
or raise a BatchprodError whose message is one line naming the file (or the command line); never
any other exception, never more than 2 s, never a file written. Seeded (derandomized) and bounded.
"""

from __future__ import annotations

import collections
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchprod.config import Context, load_config
from batchprod.errors import BatchprodError
from batchprod.pipeline import check_config_labels, load_pipeline
from batchprod.testing import write_submit
from batchprod.workflow.clustering import clusters_from_config, final_job_from_config

FIGURES: collections.Counter[str] = collections.Counter()
FUZZ = settings(derandomize=True, database=None, deadline=2000, max_examples=600, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BASE_CONFIG: dict[str, Any] = {
    "includeConfigs": ["site.yaml"],
    "pipelineYaml": "pipeline.yaml",
    "payload": {"payloadName": "fz", "repo": "repo", "outputRun": "u/{operator}/{payloadName}/{timestamp}",
                "dataQuery": "visit IN (1..10) AND detector != 3", "inCollection": "raw,calib"},
    "project": "p1",
    "campaign": "{project}-c",
    "variables": {"tier": "big", "v0": "{v1}", "v1": "x"},
    "computeSite": "local",
    "requestMemory": 2048,
    "requestCpus": 1,
    "requestWalltime": "01:00:00",
    "numberOfRetries": 2,
    "memoryMultiplier": 2.0,
    "memoryLimit": "16GB",
    "pipetask": {"coadd": {"requestMemory": "4GB", "priority": 10}},
    "cluster": {"perVisit": {"pipetasks": ["calibrate"], "dimensions": ["visit"]}},
    "finalJob": {"command": "echo ${HOME} {project}", "whenRun": "ALWAYS", "outputs": ["final.txt"]},
}
SITE_CONFIG: dict[str, Any] = {
    "site": {"local": {"cores": 2, "memory": "8GB"}, "slurm": {"wmsServiceClass": "slurm", "partition": "debug"}},
    "maxPreemptions": 3,
}
BASE_PIPELINE: dict[str, Any] = {
    "description": "fuzz",
    "tasks": {
        "calibrate": {"python": "batchprod.testing:alloc_task", "dimensions": ["visit", "detector"],
                      "inputs": ["raw"], "outputs": ["calexp"], "config": {"mb": 10, "hold": 0.1}},
        "coadd": {"command": "cat {inputs.calexp} > {outputs.deepCoadd}", "dimensions": ["tract", "patch"],
                  "inputs": ["calexp"], "outputs": ["deepCoadd"]},
    },
}

NASTY_STRINGS = [
    "", " ", "{a}", "{project}", "{v0}{v0}", "${NOPE_NOT_SET}", "${HOME}", "{", "}", "{{x}}", "$", "a\0b", "\n", "a\nb",
    "../../../x", "/etc/passwd", "x" * 300, "os:system", "os:path", "nosuch_mod:f", "batchprod.wms.base:BaseWmsService",
    "4GB", "0.1KB", "1e999GB", "01:00:00", "99999999:00:00", "nan", "inf", "-1", "0", "calibrate", "coadd", "finalJob",
    "ALWAYS", "SOMETIMES", "local", "slurm", "nowhere", "é", "\u202e", "\ud7ff", "'", '"', "*a", "&a", "!!binary", "%",
]
NASTY_SNIPPETS = [
    'lol0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"lol{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)),
    "rec: &r [1, *r]\n",
    "deep: " + "[" * 10000 + "]" * 10000 + "\n",
    "deepmap: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
    "requestCpus: 1\nrequestCpus: 2\n",
    "x: !!python/object/apply:os.system ['echo pwned']\n",
    'project: "a\\0b"\n',
    "requestMemory: " + "9" * 5000 + "\n",
    "memoryMultiplier: .nan\n",
    "requestMemory: .inf\n",
    "alias: *undefined\n",
    "---\nsecond: doc\n",
    "\tbad: tab\n",
    "m: &m {requestCpus: 2}\npipetask: {coadd: {<<: *m}}\n",
    "date: 2024-13-45\n",
    "? [1, 2]\n: x\n",
    "key: [unclosed\n",
]


def nest(depth: int, leaf: Any = 1) -> Any:
    out = leaf
    for i in range(depth):
        out = [out] if i % 2 else {"k": out}
    return out


scalars = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=-3, max_value=5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.sampled_from(NASTY_STRINGS),
    st.binary(max_size=6),
    st.dates(),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(["requestCpus", "pipetasks", "cores", "a", "x"]), st.text(max_size=5)),
                    scalars, max_size=3),
    st.integers(min_value=1, max_value=120).map(nest),
)


#: Values a real config holds (so that a good share of mutants load and reach the later checks).
plausible = st.one_of(
    st.integers(min_value=0, max_value=64),
    st.sampled_from(["4GB", "512MB", "01:00:00", "10", "calibrate", "coadd", "calibrate,coadd", "visit", "local",
                     "ALWAYS", "SUCCESS", "{project}", "x-{tier}", "batchprod.testing:alloc_task", "echo {label}"]),
    st.lists(st.sampled_from(["calibrate", "coadd", "visit", "detector", "raw", "calexp"]), max_size=2),
    st.floats(min_value=1, max_value=8),
)


def key_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append((*prefix, k))
            out.extend(key_paths(v, (*prefix, k)))
    return out


def mutate_tree(data: st.DataObject, tree: dict[str, Any]) -> dict[str, Any]:
    """One to three edits: set a random value at an existing or new key, delete a key, rename one."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    for _ in range(data.draw(st.integers(1, 3), label="n_edits")):
        paths = key_paths(tree)
        new_path = st.lists(st.text(max_size=8), min_size=1, max_size=3).map(tuple)
        fresh = not paths or data.draw(st.integers(0, 7), label="fresh_key") == 0  # mostly existing keys
        path = data.draw(new_path if fresh else st.sampled_from(paths), label="path")
        parent: Any = tree
        for part in path[:-1]:
            if not isinstance(parent, dict):
                break
            parent = parent.setdefault(part, {})
        if not isinstance(parent, dict):
            continue
        op = data.draw(st.sampled_from(["set"] * 6 + ["delete", "rename"]), label="op")
        if op == "set":
            real = data.draw(st.integers(0, 2), label="plausible") == 0
            parent[path[-1]] = data.draw(plausible if real else values, label="value")
        elif op == "delete":
            parent.pop(path[-1], None)
        elif path[-1] in parent:
            parent[data.draw(st.text(max_size=10), label="new_name")] = parent.pop(path[-1])
    return tree


def mutate_bytes(data: st.DataObject, text: bytes) -> bytes:
    """Sometimes a byte-level edit on the serialized YAML: a nasty snippet, random bytes, a cut."""
    op = data.draw(st.sampled_from(["none"] * 5 + ["snippet", "snippet", "bytes", "cut", "latin1"]), label="byte_op")
    at = data.draw(st.integers(0, len(text)), label="offset")
    if op == "snippet":
        lines = text.split(b"\n")
        i = data.draw(st.integers(0, len(lines)), label="line")
        snippet = data.draw(st.sampled_from(NASTY_SNIPPETS), label="snippet").encode()
        return b"\n".join(lines[:i]) + (b"\n" if i else b"") + snippet + b"\n".join(lines[i:])
    if op == "bytes":
        return text[:at] + data.draw(st.binary(min_size=1, max_size=12), label="bytes") + text[at:]
    if op == "cut":
        return text[:at]
    if op == "latin1":
        return text[:at] + "é".encode("latin-1") + text[at:]
    return text


def dump(tree: Any) -> bytes:
    try:
        return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, RecursionError, UnicodeEncodeError):
        return b"project: [unrepresentable\n"


class Hang(Exception):
    pass


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(d: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*"))


def check(d: Path, call: Any) -> None:
    """Run one loader call and classify it; anything but a load or a clean one-line error fails."""
    before = snapshot(d)
    t0 = time.monotonic()
    try:
        with alarm(10):
            call()
        FIGURES["loads"] += 1
    except BatchprodError as exc:
        msg = str(exc)
        assert "\n" not in msg and "\r" not in msg, f"multi-line message: {msg!r}"
        assert str(d) in msg or os.path.realpath(d) in msg or "<command line>" in msg, f"names no file: {msg!r}"
        FIGURES["clean errors"] += 1
    except Hang:
        FIGURES["hangs"] += 1
        raise
    except BaseException:
        FIGURES["tracebacks"] += 1
        raise
    finally:
        FIGURES["cases"] += 1
        FIGURES["max ms"] = max(FIGURES["max ms"], int((time.monotonic() - t0) * 1000))
    assert snapshot(d) == before, "a loader wrote into the directory"


def use_config(cfg: Any, d: Path) -> None:
    """What prepare does with a loaded config before it builds anything (all must be clean too)."""
    pipe = load_pipeline(cfg.resolve_path("pipelineYaml"))
    check_config_labels(cfg, pipe)
    for key in ("outputRun", "submitPath", "payloadName", "dataQuery", "wmsServiceClass"):
        cfg.get(key, default=None)
    for label in pipe.labels:
        cfg.job_settings(Context(label=label))
    clusters_from_config(cfg)
    final_job_from_config(cfg)


def write_base(d: Path, config: bytes | None = None, pipeline: bytes | None = None) -> None:
    (d / "site.yaml").write_bytes(dump(SITE_CONFIG))
    (d / "submit.yaml").write_bytes(config if config is not None else dump(BASE_CONFIG))
    (d / "pipeline.yaml").write_bytes(pipeline if pipeline is not None else dump(BASE_PIPELINE))


def test_the_base_config_and_pipeline_load(tmp_path: Path) -> None:
    write_base(tmp_path)
    use_config(load_config(tmp_path / "submit.yaml"), tmp_path)


@FUZZ
@given(st.data())
def test_fuzz_load_config(data: st.DataObject) -> None:
    tree = mutate_tree(data, BASE_CONFIG)
    text = mutate_bytes(data, dump(tree))
    overrides = data.draw(st.one_of(
        st.just({}), st.just({}),
        st.dictionaries(st.one_of(st.sampled_from([".".join(p) for p in key_paths(BASE_CONFIG)] + ["", "a..b", "x\0"]),
                                  st.text(max_size=12)), values, max_size=2),
    ), label="overrides")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_base(d, config=text)
        if data.draw(st.integers(0, 3), label="mutate_include") == 0:
            (d / "site.yaml").write_bytes(mutate_bytes(data, dump(mutate_tree(data, SITE_CONFIG))))
        check(d, lambda: use_config(load_config(d / "submit.yaml", overrides), d))


@FUZZ
@given(st.data())
def test_fuzz_load_pipeline(data: st.DataObject) -> None:
    tree = mutate_tree(data, BASE_PIPELINE)
    text = mutate_bytes(data, dump(tree))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_base(d, pipeline=text)
        check(d, lambda: load_pipeline(d / "pipeline.yaml"))


@settings(FUZZ, max_examples=200)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_base(d, config=b"pipelineYaml: pipeline.yaml\n" + raw, pipeline=raw)
        check(d, lambda: load_config(d / "submit.yaml"))
        check(d, lambda: load_pipeline(d / "pipeline.yaml"))


def test_fuzz_figures() -> None:
    """The totals of the fuzz runs above (shown with -s); no traceback and no hang, ever."""
    print(f"\nfuzz figures: {dict(FIGURES)}")
    assert FIGURES["tracebacks"] == 0 and FIGURES["hangs"] == 0
    if FIGURES["cases"]:
        assert FIGURES["cases"] == FIGURES["loads"] + FIGURES["clean errors"]


# -- the CLI on the nastiest inputs ----------------------------------------------------------------
NASTY_CLI = [
    ("alias bomb", lambda c: c + NASTY_SNIPPETS[0], (), "document larger than 200000 nodes"),
    ("deep nesting", lambda c: c + "project: " + "[" * 10000 + "]" * 10000 + "\n", (), "nesting depth"),
    ("non-UTF-8", lambda c: c.encode() + b"project: caf\xe9\n", (), "not UTF-8 text"),
    ("NUL", lambda c: c + 'project: "a\\0b"\n', (), "NUL character"),
    ("huge int", lambda c: c + "requestCpus: 99999999999999999999999\n", (), "key 'requestCpus'"),
    ("var chain", lambda c: c + "project: '{v0}'\nvariables:\n" + "".join(f"  v{i}: '{{v{i + 1}}}'\n" for i in range(3000))
     + "  v3000: x\n", (), "variables nested more than"),
    ("wms os:system", lambda c: c + "wmsServiceClass: 'os:system'\n", (), "is not a WMS service class"),
    ("nan", lambda c: c + "memoryMultiplier: .nan\n", (), "expected a finite number"),
    ("requestMemory 0", lambda c: c.replace("requestMemory: 100", "requestMemory: 0"), (), "expected more than 0 MB"),
    ("dup key", lambda c: c + "requestCpus: 1\nrequestCpus: 2\n", (), "duplicate key 'requestCpus'"),
    ("finalJob python", lambda c: c + "finalJob: {python: 'nosuch_mod_q:main'}\n", (), "module 'nosuch_mod_q' not found"),
    ("-o payload=3", lambda c: c, ("-o", "payload=3"), "<command line> -o payload: key 'payload': expected a mapping"),
    ("-o a.b.c=1", lambda c: c, ("-o", "pipelineYaml.b.c=1"), "'pipelineYaml' is a value"),
    ("-o empty key", lambda c: c, ("-o", "=1"), "<command line> -o '': empty key"),
    ("bad label", lambda c: c, (), "task label '../../../x' must start with a letter"),
    ("pipeline python", lambda c: c, (), "module 'nosuch_mod_p' not found"),
    ("deep -o value", lambda c: c, ("-o", "project=" + "[" * 10000), "nesting"),
    ("unknown pipetask label", lambda c: c + "pipetask: {calibrat: {requestCpus: 2}}\n", (),
     "unknown task label 'calibrat'"),
    ("huge submitPath", lambda c: c + "submitPath: /tmp/" + "x" * 5000 + "\n", (), "key 'submitPath'"),
]


@pytest.mark.parametrize(("name", "edit", "opts", "message"), [
    p if hasattr(p, "marks") else pytest.param(*p, id=p[0]) for p in NASTY_CLI])
def test_cli_prepare_on_the_nastiest_inputs(tmp_path: Path, toy_repo: Path, cli, name: str, edit: Any,
                                            opts: tuple[str, ...], message: str) -> None:
    path = write_submit(tmp_path, repo=toy_repo)
    if name == "bad label":
        (tmp_path / "pipeline.yaml").write_text("tasks: {'../../../x': {command: 'true', inputs: [raw], outputs: [x]}}\n")
    if name == "pipeline python":
        (tmp_path / "pipeline.yaml").write_text("tasks: {a: {python: 'nosuch_mod_p:f', inputs: [raw], outputs: [x]}}\n")
    new = edit(path.read_text())
    path.write_bytes(new if isinstance(new, bytes) else new.encode())
    t0 = time.monotonic()
    r = cli("prepare", path, *opts)
    assert time.monotonic() - t0 < 5
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "submit").exists()
    assert not (toy_repo / "toy").exists()


def test_prepare_keeps_secrets_out_of_the_submit_dir(tmp_path: Path, toy_repo: Path, cli,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_FUZZ_SECRET", "hunter2-s3cret")
    path = write_submit(tmp_path, repo=toy_repo, finalJob={"command": "echo ${BP_FUZZ_SECRET} > /dev/null"})
    r = cli("prepare", path)
    assert r.exit_code == 0, r.output
    submit = tmp_path / "submit" / "toy" / "run"
    for f in submit.rglob("*"):
        if f.is_file():
            assert b"hunter2-s3cret" not in f.read_bytes(), f
    assert "${BP_FUZZ_SECRET}" in (submit / "config.yaml").read_text()
