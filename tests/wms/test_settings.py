"""Site settings: a typed model per WMS plugin, values substituted through the config's search order,
checked at prepare (one line naming file and key, nothing written)."""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
from pathlib import Path

import pytest

from batchprod.config import load_config
from batchprod.engine.prepare import prepare
from batchprod.errors import ConfigError
from batchprod.testing import make_toy_repo, write_submit
from batchprod.wms.base import Capacity, Launch
from batchprod.wms.local import LocalBackend, LocalService, LocalSettings
from batchprod.wms.parsl import ParslService, ParslSettings
from batchprod.wms.settings import SiteSettings, settings_for, site_settings
from batchprod.wms.slurm import SlurmBackend, SlurmService, SlurmSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def submit(tmp_path: Path, **keys) -> Path:
    return write_submit(tmp_path, repo=make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0,)), **keys)


def refused(tmp_path: Path, pattern: str, **keys) -> str:
    """prepare fails with one ConfigError line matching pattern and writes no submit directory."""
    path = submit(tmp_path, **keys)
    with pytest.raises(ConfigError, match=pattern) as info:
        prepare(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert not (tmp_path / "submit").exists()
    return msg


def _launch(tmp_path: Path) -> Launch:
    logs = tmp_path / "run" / "logs" / "a"
    return Launch(0, "a_visit1", "a", 1, 1, 100, 0, {}, logs / "o", logs / "e", logs / "r", run=str(tmp_path / "run"))


def test_values_are_substituted_and_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_TEST_QOS", "astro42")
    cfg = load_config(submit(tmp_path, computeSite="hpc", variables={"part": "debug", "idle": 7},
                             site={"hpc": {"wmsServiceClass": "slurm", "partition": "{part}", "account": "${USER}",
                                           "qos": "${BP_TEST_QOS}", "maxIdle": "{idle}", "maxJobs": "50",
                                           "sbatchOptions": "--constraint=haswell --comment='two words'"}}))
    s = settings_for(cfg)
    assert isinstance(s, SlurmSettings) and s.site == "hpc"
    assert (s.partition, s.account, s.qos) == ("debug", os.environ.get("USER") or getpass.getuser(), "astro42")
    assert (s.max_jobs, s.max_idle, s.poll_interval) == (50, 7, 1.0)
    args = SlurmBackend(s).sbatch_args(_launch(tmp_path))
    assert "--partition=debug" in args and "--qos=astro42" in args and "--comment=two words" in args
    assert not any(a.startswith("--tmp") for a in args)
    disk = dataclasses.replace(_launch(tmp_path), disk=512)  # ctrl_bps requestDisk: scratch space
    assert "--tmp=512M" in SlurmBackend(s).sbatch_args(disk)


def test_the_backend_gets_the_substituted_settings_of_the_run(tmp_path: Path) -> None:
    """The backend a service builds for a run reads the run's frozen config through the search order:
    '{part}' reaches it as 'debug', not literally."""
    run = prepare(submit(tmp_path, computeSite="hpc", variables={"part": "debug"},
                         site={"hpc": {"wmsServiceClass": "slurm", "partition": "{part}", "maxJobs": 9}}))
    backend = SlurmService().backend(run)
    assert isinstance(backend, SlurmBackend)
    assert backend.settings.partition == "debug" and backend.capacity() == Capacity(None, None, 9, 200)


def test_search_order_top_level_and_defaults_but_not_variables(tmp_path: Path) -> None:
    cfg = load_config(submit(tmp_path, pollInterval=3, variables={"cores": 1, "maxJobs": 2},
                             site={"local": {"memory": "2GB"}, "hpc": {"wmsServiceClass": "slurm"}}))
    local = settings_for(cfg)
    assert isinstance(local, LocalSettings)
    assert (local.cores, local.memory, local.max_jobs) == (None, 2048, None)  # variables are not settings
    assert site_settings(cfg, SlurmSettings, "hpc").poll_interval == 3.0  # the top level applies to a site


@pytest.mark.parametrize(
    ("site", "pattern"),
    [
        ({"local": {"partition": "debug"}}, r"unknown key 'site\.local\.partition' for a local site"),
        ({"local": {"cores": 2}, "hpc": {"wmsServiceClass": "slurm", "maxWorkers": 3}},
         r"unknown key 'site\.hpc\.maxWorkers' for a slurm site"),
        ({"local": {"wmsServiceClass": "parsl", "parslProvider": "k8s"}},
         r"key 'site\.local\.parslProvider': expected local or slurm, got 'k8s'"),
        ({"local": {"wmsServiceClass": "slurm", "sbatchOptions": "--comment='open"}},
         r"key 'site\.local\.sbatchOptions': cannot split into options"),
    ],
)
def test_prepare_checks_each_site_against_its_own_plugin(tmp_path: Path, site: dict, pattern: str) -> None:
    refused(tmp_path, pattern, site=site)


def test_a_variable_that_fills_a_bad_value_names_the_key(tmp_path: Path) -> None:
    refused(tmp_path, r"key 'site\.hpc\.maxJobs': expected a positive integer, got '0'", computeSite="hpc",
            variables={"n": 0}, site={"hpc": {"wmsServiceClass": "slurm", "maxJobs": "{n}"}})


def test_the_loader_knows_every_plugins_keys(tmp_path: Path) -> None:
    """A key no plugin declares is refused when the file is read, with the key it resembles."""
    with pytest.raises(ConfigError, match=r"unknown key 'site\.hpc\.maxJob' \(did you mean 'maxJobs'\?\)"):
        load_config(submit(tmp_path / "a", site={"hpc": {"wmsServiceClass": "slurm", "maxJob": 3}}))
    with pytest.raises(ConfigError, match=r"key 'site\.hpc\.pollInterval': expected a finite number"):
        load_config(submit(tmp_path / "b", site={"hpc": {"wmsServiceClass": "slurm", "pollInterval": float("inf")}}))


def test_cli_prepare_exit_2_one_line(tmp_path: Path, cli) -> None:
    r = cli("prepare", submit(tmp_path, site={"local": {"qos": "high"}}))
    assert r.exit_code == 2
    assert re.search(r"unknown key 'site\.local\.qos' for a local site", r.output), r.output
    assert not (tmp_path / "submit").exists()


def test_capacity_comes_from_the_settings() -> None:
    assert LocalBackend(LocalSettings(cores=3, memory="2GB", maxJobs=5)).capacity() == Capacity(3, 2048, 5)
    mine = LocalBackend(LocalSettings()).capacity()
    assert mine.cores == os.cpu_count() and mine.memory_mb and mine.max_jobs is None
    assert SlurmBackend(SlurmSettings(maxJobs=10, maxIdle=4)).capacity() == Capacity(None, None, 10, 4)
    assert SlurmSettings().site == "slurm" and LocalSettings().for_site("here").site == "here"


@pytest.mark.parametrize("service", [LocalService, SlurmService, ParslService])
def test_settings_are_documented(service) -> None:
    """Every setting has a type, a default and a description, and README lists it."""
    model: type[SiteSettings] = service.settings_model
    readme = README.read_text()
    for key, _typ, _default, desc in model.describe():
        assert desc, f"{service.name}: {key} has no description"
        assert re.search(rf"\| `{service.name}` \| `{key}` \|", readme), f"README does not document {service.name} {key}"


def test_parsl_walltime_and_provider(tmp_path: Path) -> None:
    cfg = load_config(submit(tmp_path, computeSite="p", site={"p": {
        "wmsServiceClass": "parsl", "parslProvider": "slurm", "walltime": "02:00:00", "maxWorkers": 4}}))
    s = settings_for(cfg)
    assert isinstance(s, ParslSettings) and (s.provider, s.walltime, s.max_workers) == ("slurm", 7200, 4)
