"""The site catalog (issue 10 item 1): loading and checking, scheduled state, the ``sites`` CLI, fuzzing."""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchprod.campaign.sites import (
    CatalogSite,
    Downtime,
    SiteState,
    add_downtime,
    load_catalog,
    scheduled_state,
)
from batchprod.errors import BatchprodError, ConfigError
from batchprod.wms.base import Capacity
from batchprod.wms.local import LocalSettings

CATALOG = """\
# the sites of the survey
sites:
  laptop:  {wmsServiceClass: local, cores: 2, memory: 4GB}
  cluster: {wmsServiceClass: slurm, partition: debug, maxJobs: 500, maxIdle: 50, sharedFilesystem: true,
            opportunistic: false, weight: 1.0,
            downtimes: [{start: "2026-12-01T08:00:00Z", end: "2026-12-01T12:00:00Z", reason: "kernel update"}]}
  spare:   {wmsServiceClass: local, cores: 1, opportunistic: true}
"""



def t(hour: int, minute: int = 0, day: int = 1) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    p = tmp_path / "sites.yaml"
    p.write_text(CATALOG)
    return p


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sites.yaml"
    p.write_text(text)
    return p


# -- loading ------------------------------------------------------------------------------------------

def test_the_example_catalog_loads(catalog: Path) -> None:
    cat = load_catalog(catalog)
    assert list(cat.sites) == ["laptop", "cluster", "spare"]
    laptop, cluster, spare = cat["laptop"], cat["cluster"], cat["spare"]
    assert laptop.wms == "local" and laptop.capacity == Capacity(2, 4096, None, None)
    assert laptop.shared_filesystem and not laptop.opportunistic and laptop.weight == 1.0 and laptop.downtimes == ()
    assert isinstance(laptop.settings, LocalSettings) and laptop.settings.site == "laptop"
    assert cluster.wms == "slurm" and cluster.settings.partition == "debug"  # type: ignore[attr-defined]
    assert cluster.capacity == Capacity(None, None, 500, 50)  # cores and memory: the scheduler's
    assert cluster.downtimes == (Downtime(start=t(8), end=t(12), reason="kernel update"),)
    assert spare.opportunistic and spare.capacity.cores == 1 and spare.capacity.memory_mb  # this machine's


def test_defaults_and_unquoted_timestamps(tmp_path: Path) -> None:
    cat = load_catalog(write(tmp_path, "sites:\n  a: {}\n  b:\n    weight: 2.5\n    sharedFilesystem: false\n"
                             "    downtimes:\n    - {start: 2026-12-01T10:00:00+02:00, end: 2026-12-01T09:00:00Z}\n"
                             "    - {start: '2026-11-30T00:00:00Z', end: '2026-11-30T01:00:00Z'}\n"))
    assert cat["a"].wms == "local" and cat["a"].weight == 1.0
    b = cat["b"]
    assert b.weight == 2.5 and not b.shared_filesystem
    # in UTC, sorted by start
    nov30 = datetime(2026, 11, 30, tzinfo=UTC)
    assert [(d.start, d.end) for d in b.downtimes] == [(nov30, nov30 + timedelta(hours=1)), (t(8), t(9))]



def test_the_dispatchers_sites_carry_the_catalogs_weight_and_capacity(tmp_path: Path) -> None:
    """What the catalog says reaches the dispatcher: the weight (placement divides load by it) and a
    local site's capacity, also when the plugin is named by its dotted class path."""
    from batchprod.campaign.sites import engine_sites

    cat = load_catalog(write(tmp_path, "sites:\n  a: {weight: 3, cores: 2}\n"
                             "  b: {wmsServiceClass: 'batchprod.wms.local:LocalService'}\n"))
    a, b = engine_sites(cat)
    assert a.weight == 3.0 and b.weight == 1.0 and a.cores == 2
    assert cat["b"].capacity.cores == (os.cpu_count() or 1) and cat["b"].capacity.memory_mb
    assert b.cores == cat["b"].capacity.cores


BAD = [
    ("unknown plugin key", "sites: {cluster: {wmsServiceClass: slurm, maxJob: 3}}",
     "sites.cluster.maxJob: unknown key for a slurm site (did you mean 'maxJobs'?)"),
    ("a slurm key on a local site", "sites: {a: {partition: debug}}", "sites.a.partition: unknown key for a local site"),
    ("unknown catalog key", "sites: {a: {oportunistic: true}}", "(did you mean 'opportunistic'?)"),
    ("bad plugin value", "sites: {cluster: {wmsServiceClass: slurm, maxJobs: 0}}",
     "sites.cluster.maxJobs: expected a positive integer, got 0"),
    ("a job value", "sites: {a: {requestMemory: 1GB}}",
     "sites.a.requestMemory: a job value, not a site's: set requestMemory in the submit config"),
    ("site name", "sites: {'a b': {}}", "sites.a b: a site name is 1 to 64"),
    ("long site name", "sites: {" + "x" * 65 + ": {}}", "a site name is 1 to 64"),
    ("unknown plugin", "sites: {a: {wmsServiceClass: nope}}", "sites.a.wmsServiceClass: wmsServiceClass 'nope': unknown WMS"),
    ("not a plugin", "sites: {a: {wmsServiceClass: 'os:system'}}", "is not a WMS service class"),
    ("date only", "sites: {a: {downtimes: [{start: 2026-12-01, end: '2026-12-02T00:00:00Z'}]}}",
     "sites.a.downtimes[0].start: expected a time with a zone"),
    ("no zone", "sites: {a: {downtimes: [{start: '2026-12-01T08:00:00', end: '2026-12-01T10:00:00Z'}]}}",
     "sites.a.downtimes[0].start: time '2026-12-01T08:00:00' has no zone"),
    ("not a time", "sites: {a: {downtimes: [{start: 'soon', end: '2026-12-01T10:00:00Z'}]}}",
     "sites.a.downtimes[0].start: expected an ISO 8601 time"),
    ("missing end", "sites: {a: {downtimes: [{start: '2026-12-01T08:00:00Z'}]}}", "sites.a.downtimes[0].end: missing"),
    ("reversed", "sites: {a: {downtimes: [{start: '2026-12-01T08:00:00Z', end: '2026-12-01T07:00:00Z'}]}}",
     "sites.a.downtimes[0]: end 2026-12-01T07:00:00Z is not after start"),
    ("empty window", "sites: {a: {downtimes: [{start: '2026-12-01T08:00:00Z', end: '2026-12-01T09:00:00+01:00'}]}}",
     "is not after start"),
    ("overlap", "sites: {a: {downtimes: [{start: '2026-12-01T08:00:00Z', end: '2026-12-01T10:00:00Z'},"
     "{start: '2026-12-01T09:00:00Z', end: '2026-12-01T11:00:00Z'}]}}", "sites.a.downtimes[1]: window"),
    ("downtime key", "sites: {a: {downtimes: [{start: '2026-12-01T08:00:00Z', end: '2026-12-01T09:00:00Z', "
     "reasn: x}]}}", "sites.a.downtimes[0].reasn: unknown key (did you mean 'reason'?)"),
    ("downtimes not a list", "sites: {a: {downtimes: 3}}", "sites.a.downtimes: expected a list"),
    ("weight 0", "sites: {a: {weight: 0}}", "sites.a.weight:"),
    ("weight nan", "sites: {a: {weight: .nan}}", "expected a finite number"),
    ("opportunistic not bool", "sites: {a: {opportunistic: 3}}", "sites.a.opportunistic:"),
    ("empty", "sites: {}", "sites: the catalog has no site"),
    ("empty file", "", "expected a mapping with a 'sites' key"),
    ("non-mapping", "[1, 2]", "expected a mapping with a 'sites' key"),
    ("site not a mapping", "sites: {a: 3}", "sites.a: expected a mapping"),
    ("sites not a mapping", "sites: [a]", "sites: expected a mapping"),
    ("top key", "sitez: {a: {}}", "sitez: unknown key (did you mean 'sites'?)"),
    ("duplicate key", "sites: {a: {}, a: {}}", "duplicate key 'a'"),
]


@pytest.mark.parametrize(("name", "text", "message"), [pytest.param(*b, id=b[0]) for b in BAD])
def test_bad_catalogs_are_one_line_naming_file_and_key(tmp_path: Path, name: str, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_catalog(p)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(p)), msg
    assert message in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_catalog(tmp_path / "nope.yaml")


# -- scheduled state -------------------------------------------------------------------------------

def site(*windows: tuple[datetime, datetime]) -> CatalogSite:
    return CatalogSite("s", "local", LocalSettings(), Capacity(1, 1024),
                       downtimes=tuple(Downtime(start=a, end=b, reason="r") for a, b in windows))


def test_scheduled_state_online_draining_down() -> None:
    s = site((t(8), t(12)), (t(20), t(22)))
    st0 = scheduled_state(s, t(6))
    assert st0.state is SiteState.ONLINE and st0.since is None
    # work of 2 h started at 6:00 ends at 8:00: touches nothing ([start, end) windows)
    assert scheduled_state(s, t(6), walltime=7200).state is SiteState.ONLINE
    dr = scheduled_state(s, t(6), walltime=7201)
    assert dr.state is SiteState.DRAINING and dr.since == t(8) - timedelta(seconds=7201)
    assert "2026-12-01T08:00:00Z..2026-12-01T12:00:00Z (r)" in dr.evidence
    down = scheduled_state(s, t(8))
    assert down.state is SiteState.DOWN and down.since == t(8) and "scheduled downtime" in down.evidence
    assert scheduled_state(s, t(11, 59), walltime=10**6).state is SiteState.DOWN
    after = scheduled_state(s, t(12))
    assert after.state is SiteState.ONLINE and after.since == t(12) and "last ended" in after.evidence
    assert scheduled_state(s, t(12), walltime=8 * 3600 + 1).state is SiteState.DRAINING  # the 20:00 window
    assert scheduled_state(s, t(23)).since == t(22)
    # any zone for now
    assert scheduled_state(s, datetime(2026, 12, 1, 9, tzinfo=timezone(timedelta(hours=1)))).state is SiteState.DOWN
    assert scheduled_state(site(), t(6), walltime=10**9).state is SiteState.ONLINE


def test_scheduled_state_refuses_naive_now_and_negative_walltime() -> None:
    with pytest.raises(ValueError, match="zone"):
        scheduled_state(site(), datetime(2026, 12, 1))
    with pytest.raises(ValueError, match="walltime"):
        scheduled_state(site(), t(1), walltime=-1)


def test_status_json() -> None:
    s = scheduled_state(site((t(8), t(12))), t(9))
    assert s.to_json() == {"state": "down", "since": "2026-12-01T08:00:00Z",
                           "evidence": "scheduled downtime 2026-12-01T08:00:00Z..2026-12-01T12:00:00Z (r)"}
    assert {x.value for x in SiteState} == {"online", "degraded", "draining", "down", "probing"}


# -- add-downtime ------------------------------------------------------------------------------------

def test_add_downtime_rewrites_atomically_and_keeps_the_rest(catalog: Path) -> None:
    before = load_catalog(catalog)
    w = add_downtime(catalog, "cluster", "2026-12-02T11:00:00+01:00", "2026-12-02T13:00:00Z", "disk swap")
    assert (w.start, w.end, w.reason) == (t(10, day=2), t(13, day=2), "disk swap")
    after = load_catalog(catalog)
    assert after["cluster"].downtimes == (*before["cluster"].downtimes, w)
    for name in ("laptop", "spare"):
        assert after[name] == before[name]
    assert [p.name for p in catalog.parent.iterdir()] == ["sites.yaml"]  # no temporary left
    data = yaml.safe_load(catalog.read_text())
    assert data["sites"]["cluster"]["downtimes"][-1] == {"start": "2026-12-02T10:00:00Z",
                                                         "end": "2026-12-02T13:00:00Z", "reason": "disk swap"}
    # a site without downtimes yet
    add_downtime(catalog, "laptop", "2026-12-03T00:00:00Z", "2026-12-03T01:00:00Z")
    assert load_catalog(catalog)["laptop"].downtimes[0].reason == ""


@pytest.mark.parametrize(("args", "message"), [
    (("cluster", "2026-12-01T11:00:00Z", "2026-12-01T13:00:00Z"), "new window 2026-12-01T11:00:00Z..2026-12-01T13:00:00Z "
     "overlaps 2026-12-01T08:00:00Z..2026-12-01T12:00:00Z (kernel update)"),
    (("cluster", "2026-12-01T07:00:00Z", "2026-12-01T13:00:00Z"), "overlaps"),
    (("cluster", "2026-12-05T07:00:00Z", "2026-12-05T06:00:00Z"), "is not after start"),
    (("cluster", "2026-12-05T07:00:00", "2026-12-05T08:00:00Z"), "has no zone"),
    (("clustr", "2026-12-05T07:00:00Z", "2026-12-05T08:00:00Z"), "sites.clustr: no such site (did you mean 'cluster'?)"),
])
def test_add_downtime_refuses_and_writes_nothing(catalog: Path, args: tuple[str, str, str], message: str) -> None:
    before = catalog.read_bytes(), catalog.stat().st_mtime_ns
    with pytest.raises(ConfigError) as exc:
        add_downtime(catalog, *args)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert (catalog.read_bytes(), catalog.stat().st_mtime_ns) == before
    assert [p.name for p in catalog.parent.iterdir()] == ["sites.yaml"]


def test_add_downtime_refuses_a_bad_catalog(tmp_path: Path) -> None:
    p = write(tmp_path, "sites: {a: {cores: 0}}")
    with pytest.raises(ConfigError, match="sites.a.cores"):
        add_downtime(p, "a", "2026-12-05T07:00:00Z", "2026-12-05T08:00:00Z")
    assert p.read_text() == "sites: {a: {cores: 0}}"


# -- CLI -----------------------------------------------------------------------------------------------

def test_cli_sites_show(catalog: Path, cli) -> None:
    r = cli("sites", "show", catalog, "--at", "2026-12-01T09:00:00Z")
    assert r.exit_code == 0, r.output
    out = r.output
    for word in ("laptop", "cluster", "spare", "slurm", "500", "4 GB", "kernel update"):
        assert word in out, out
    cluster_line = next(line for line in out.splitlines() if "cluster" in line)
    assert "down" in cluster_line
    r = cli("sites", "show", catalog, "--json", "--at", "2026-12-01T07:00:00+00:00")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    sites = {s["name"]: s for s in data["sites"]}
    assert data["now"] == "2026-12-01T07:00:00Z"
    assert sites["cluster"]["capacity"] == {"cores": None, "memory_mb": None, "max_jobs": 500, "max_queued": 50}
    assert sites["cluster"]["next_downtime"]["reason"] == "kernel update"
    assert sites["cluster"]["status"]["state"] == "online"
    assert sites["spare"]["opportunistic"] is True and sites["laptop"]["capacity"]["cores"] == 2


@pytest.mark.parametrize(("text", "opts", "message"), [
    ("sites: {cluster: {wmsServiceClass: slurm, maxJobs: -1}}", (), "sites.cluster.maxJobs"),
    ("[1]", (), "expected a mapping"),
    (CATALOG, ("--at", "tomorrow"), "<command line> --at: expected an ISO 8601 time"),
])
def test_cli_sites_show_errors(tmp_path: Path, cli, text: str, opts: tuple[str, ...], message: str) -> None:
    p = write(tmp_path, text)
    r = cli("sites", "show", p, *opts)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_cli_add_downtime(catalog: Path, cli) -> None:
    r = cli("sites", "add-downtime", catalog, "spare", "--start", "2026-12-03T00:00:00Z", "--end",
            "2026-12-03T06:00:00Z", "--reason", "power work")
    assert r.exit_code == 0, r.output
    assert "2026-12-03T00:00:00Z..2026-12-03T06:00:00Z (power work)" in r.output
    assert load_catalog(catalog)["spare"].downtimes[0].reason == "power work"
    before = catalog.read_bytes()
    r = cli("sites", "add-downtime", catalog, "spare", "--start", "2026-12-03T05:00:00Z", "--end", "2026-12-03T07:00:00Z")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sites.spare.downtimes: new window" in lines[0] and "overlaps" in lines[0]
    assert catalog.read_bytes() == before
    r = cli("sites", "add-downtime", tmp := catalog.parent / "none.yaml", "a", "--start", "x", "--end", "y")
    assert r.exit_code == 2 and "file not found" in r.stderr and not tmp.exists()


# -- fuzz ----------------------------------------------------------------------------------------------

FUZZ = settings(derandomize=True, database=None, deadline=2000, max_examples=300, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BASE = yaml.safe_load(CATALOG)
NASTY = ["", "x" * 300, "a\0b", "2026-12-01", "2026-12-01T08:00:00", "2026-12-01T08:00:00Z", "9999-12-31T23:59:59-23:59",
         "0001-01-01T00:00:00+14:00", "4GB", "-1", "nan", "slurm", "local", "os:system", "nosuch_mod:C", "é", "\u202e"]
scalars = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.none(), st.text(max_size=12), st.sampled_from(NASTY), st.datetimes(timezones=st.just(UTC)),
                    st.dates())
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(
    st.sampled_from(["start", "end", "reason", "cores", "x"]), scalars, max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["start", "end", "reason"]), st.one_of(scalars, st.sampled_from(NASTY)),
                             max_size=3), max_size=3))
#: values a real catalog holds (so that a good share of mutants load and reach the later checks)
PLAUSIBLE = st.sampled_from([1, 2, 500, "4GB", True, False, 1.5, "debug", "local", "slurm", [], None,
                             [{"start": "2026-12-02T00:00:00Z", "end": "2026-12-02T02:00:00Z"}]])
SNIPPETS = ["a: &a [*a]\n", "deep: " + "[" * 5000 + "]" * 5000 + "\n", "x: !!python/object/apply:os.system ['true']\n",
            "sites: {a: {}}\nsites: {b: {}}\n", "\tbad\n", 'q: "a\\0b"\n']


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append((*prefix, k))
            out.extend(paths(v, (*prefix, k)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.extend(paths(v, (*prefix, i)))
    return out


def mutate(data: st.DataObject) -> bytes:
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(data.draw(st.integers(1, 3))):
        if not paths(tree):
            break
        path = data.draw(st.sampled_from(paths(tree)))
        parent: Any = tree
        for part in path[:-1]:
            parent = parent[part]
        op = data.draw(st.sampled_from(["set", "set", "set", "delete", "rename"]))
        if op == "set":
            parent[path[-1]] = data.draw(st.one_of(PLAUSIBLE, values))
        elif op == "delete" and isinstance(parent, dict):
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10))] = parent.pop(path[-1])
    try:
        text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, UnicodeEncodeError):
        text = b"sites: [unrepresentable\n"
    op = data.draw(st.sampled_from(["none"] * 4 + ["snippet", "bytes", "cut"]))
    at = data.draw(st.integers(0, len(text)))
    if op == "snippet":
        text = text + b"\n" + data.draw(st.sampled_from(SNIPPETS)).encode()
    elif op == "bytes":
        text = text[:at] + data.draw(st.binary(min_size=1, max_size=8)) + text[at:]
    elif op == "cut":
        text = text[:at]
    return text


def one_clean_outcome(d: Path, call: Any) -> None:
    """A load (or edit), or one clean line naming the file; never a traceback, never slow."""
    t0 = time.monotonic()
    try:
        call()
    except BatchprodError as exc:
        msg = str(exc)
        assert "\n" not in msg and "\r" not in msg, msg
        assert str(d) in msg or os.path.realpath(d) in msg, msg
    assert time.monotonic() - t0 < 5


@FUZZ
@given(st.data())
def test_fuzz_the_catalog_loader(data: st.DataObject) -> None:
    text = mutate(data)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        p = d / "sites.yaml"
        p.write_bytes(text)
        before = sorted((q.name, q.stat().st_mtime_ns) for q in d.iterdir())
        one_clean_outcome(d, lambda: load_catalog(p))
        assert sorted((q.name, q.stat().st_mtime_ns) for q in d.iterdir()) == before, "the loader wrote"
        # add-downtime on the same file: a clean error, or a file that loads again with one window more
        start = data.draw(st.one_of(st.just("2026-12-09T00:00:00Z"), st.sampled_from(NASTY)))
        end = data.draw(st.one_of(st.just("2026-12-09T01:00:00Z"), st.sampled_from(NASTY)))
        site_name = data.draw(st.sampled_from(["cluster", "laptop", "nope"]))
        one_clean_outcome(d, lambda: add_downtime(p, site_name, start, end, "fuzz"))
        assert [q.name for q in d.iterdir()] == ["sites.yaml"]
        try:
            load_catalog(p)
        except BatchprodError:
            assert p.read_bytes() == text  # a catalog that did not load was never rewritten


def _add_one(args: tuple[str, int]) -> None:
    add_downtime(Path(args[0]), "laptop", f"2027-01-01T{args[1]:02d}:00:00Z", f"2027-01-01T{args[1]:02d}:30:00Z",
                 f"w{args[1]}")


def test_concurrent_add_downtime_keeps_every_window(catalog: Path) -> None:
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.map(_add_one, [(str(catalog), h) for h in range(12)])
    windows = load_catalog(catalog)["laptop"].downtimes
    assert sorted(d.reason for d in windows) == sorted(f"w{h}" for h in range(12))
    assert [p.name for p in catalog.parent.iterdir()] == ["sites.yaml"]


def test_a_catalog_drives_two_runs_on_its_two_local_sites(tmp_path: Path) -> None:
    """Real processes: the engine's sites built from a catalog; a site in scheduled downtime gets nothing."""
    from batchprod.campaign.sites import engine_sites, load_catalog
    from batchprod.engine.orchestrator import Engine
    from batchprod.engine.prepare import prepare
    from batchprod.testing import command_task, make_toy_repo, write_submit

    (tmp_path / "sites.yaml").write_text(
        "sites:\n"
        "  small: {wmsServiceClass: local, cores: 1}\n"
        "  big: {wmsServiceClass: local, cores: 2}\n"
        "  closed: {wmsServiceClass: local, cores: 2, downtimes: [{start: '2000-01-01T00:00:00Z',"
        " end: '2999-01-01T00:00:00Z', reason: forever}]}\n")
    sites = engine_sites(load_catalog(tmp_path / "sites.yaml"))
    assert [(s.name, s.cores) for s in sites] == [("small", 1), ("big", 2), ("closed", 2)]
    pipeline = {"tasks": {"noop": command_task(["visit", "detector"], ["raw"], ["out"], "touch {outputs.out}")}}
    runs = [prepare(write_submit(tmp_path / f"run{r}", pipeline, requestWalltime=60,
                                 repo=make_toy_repo(tmp_path / f"repo{r}", visits=range(12), detectors=(0,))))
            for r in range(2)]
    engine = Engine(sites)
    assert sorted(engine.execute(runs).values()) == ["SUCCEEDED", "SUCCEEDED"]
    used = {a["site"] for run in runs for a in run.store.attempts()}
    assert used == {"small", "big"}
    assert engine.dispatcher.skips[("closed", "downtime")] > 0
    assert sites[0].peak["cores"] <= 1 and sites[1].peak["cores"] <= 2


def test_a_running_dispatcher_takes_a_downtime_added_to_its_catalog(tmp_path: Path) -> None:
    """``sites add-downtime`` while ``campaign run`` runs: the next control round drains the site;
    a catalog edited into something unreadable is said and the one in use kept."""
    from batchprod.campaign.sites import add_downtime
    from batchprod.campaign.testing import runner

    cat = write(tmp_path, "sites:\n  a: {cores: 1}\n  b: {cores: 1, weight: 2}\n")
    said: list[str] = []
    r = runner(f"sqlite:///{tmp_path / 'c.db'}", cat, catalog_path=cat, log=said.append)
    a, b = r.sites
    assert a.downtimes == [] and b.weight == 2.0
    now = datetime.now(UTC).replace(microsecond=0)
    add_downtime(cat, "a", now + timedelta(minutes=5), now + timedelta(hours=1), "disk swap")
    r.control()
    assert a.downtimes == [((now + timedelta(minutes=5)).timestamp(), (now + timedelta(hours=1)).timestamp())]
    assert a.crosses_downtime(now.timestamp(), 3600) and said and "re-read" in said[-1]
    text = cat.read_text()
    cat.write_text(text.replace("weight: 2", "weight: -1"))
    r.control()
    assert "not taken" in said[-1] and "weight" in said[-1] and b.weight == 2.0
    cat.write_text(text.replace("weight: 2", "weight: 3") + "  c: {cores: 1}\n")
    r.control()
    assert b.weight == 3.0 and "sites added (c)" in said[-1]
