"""Provenance contexts: secrets never stored, per-job noise left out so contexts are shared."""

from __future__ import annotations

import batchprod
from batchprod.provenance.capture import (
    REDACTED,
    context_hash,
    context_record,
    environment,
    package_versions,
    payload_modules,
)


def test_secret_values_are_redacted_and_per_job_variables_dropped() -> None:
    env = environment({"AWS_SECRET_ACCESS_KEY": "s3cr3t", "GITHUB_TOKEN": "ghp_x", "DB_PASSWORD": "pw",
                       "PATH": "/usr/bin", "BATCHPROD_ATTEMPT": "2", "SLURM_JOB_ID": "77", "HOME": "/root"})
    assert env["AWS_SECRET_ACCESS_KEY"] == env["GITHUB_TOKEN"] == env["DB_PASSWORD"] == REDACTED
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/root"
    assert "BATCHPROD_ATTEMPT" not in env and "SLURM_JOB_ID" not in env


def test_context_is_shared_by_attempts_and_changes_with_the_software_environment() -> None:
    base = {"PATH": "/usr/bin", "LSST_HOME": "/opt/lsst"}
    a = context_record(env={**base, "BATCHPROD_JOB": "calibrate_1", "BATCHPROD_ATTEMPT": "1", "SLURM_JOB_ID": "1"})
    b = context_record(env={**base, "BATCHPROD_JOB": "coadd_2", "BATCHPROD_ATTEMPT": "3", "SLURM_JOB_ID": "2"})
    assert context_hash(a) == context_hash(b)
    c = context_record(env={**base, "LSST_HOME": "/opt/lsst-w.2026.48"})
    assert context_hash(c) != context_hash(a)


def test_package_versions_include_payload_distributions() -> None:
    versions = package_versions(payload_modules([{"python": "batchprod.demo.tasks:coadd"}, {"command": "x"}]))
    assert versions["batchprod"] == batchprod.__version__
    assert "numpy" in versions and "sqlalchemy" in versions
    assert "nosuchpackage" not in package_versions(["nosuchpackage.mod"])
