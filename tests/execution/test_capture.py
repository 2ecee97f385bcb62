"""Provenance contexts: secrets never stored, per-job noise left out so contexts are shared."""

from __future__ import annotations

import batchprod
from batchprod.execution.capture import (
    REDACTED,
    context_hash,
    context_record,
    environment,
    environment_names,
    package_versions,
    payload_modules,
    sanitize_record,
    scrub,
)

SECRETS = {
    "DATABASE_URL": "postgresql://user:hunter2@db/x",
    "GITHUB_PAT": "ghp_" + "a1B2c3D4e5" * 4,
    "MY_SERVICE_TOKEN": "tok-98765-zyxw",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "SOME_VAR": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl",
    "DB_PASSWORD": "pw",
}


def test_only_allowed_values_are_recorded_the_rest_by_name() -> None:
    env = {**SECRETS, "PATH": "/usr/bin", "HOME": "/root", "LC_ALL": "C", "LSST_HOME": "/opt/lsst",
           "BATCHPROD_SUBMIT_ROOT": "/s", "BATCHPROD_ATTEMPT": "2", "SLURM_JOB_ID": "77", "OMP_NUM_THREADS": "4"}
    values, names = environment(env), environment_names(env)
    assert values == {"PATH": "/usr/bin", "HOME": "/root", "LC_ALL": "C", "LSST_HOME": "/opt/lsst",
                      "BATCHPROD_SUBMIT_ROOT": "/s"}
    assert names == sorted(SECRETS)  # per-job variables are neither values nor names
    # an allowed prefix with a secret-looking name is recorded by name only
    assert environment({"LSST_DB_PASSWORD": "x", "BATCHPROD_API_TOKEN": "y"}) == {}


def test_secrets_inside_allowed_values_are_scrubbed() -> None:
    cases = {
        "postgresql://user:hunter2@db/x": "postgresql://<redacted>@db/x",
        "https://me:p/w@d@host/x": "https://<redacted>@host/x",
        "ghp_" + "a1B2c3D4e5" * 4: REDACTED,
        "a github_pat_11ABCDEFG0123456789_abcdefghij": f"a {REDACTED}",
        "glpat-abcdefghij0123456789": REDACTED,
        "xoxb-1234-5678-abcdefgh": REDACTED,
        "AKIAIOSFODNN7EXAMPLE": REDACTED,
        SECRETS["SOME_VAR"]: REDACTED,
        "k=0123456789abcdef0123456789abcdef01": f"k={REDACTED}",
        "x:" + SECRETS["AWS_SECRET_ACCESS_KEY"] + "==": f"x:{REDACTED}",
        "--password=abc db_password=x token: abc": f"--password={REDACTED} db_password={REDACTED} token: {REDACTED}",
        "https://h/x?sig=abcdEF12&a=1": f"https://h/x?sig={REDACTED}&a=1",
    }
    for value, want in cases.items():
        assert scrub(value) == want, value
        assert scrub(want) == want  # idempotent
    # ordinary paths and versions are kept
    for value in ("/usr/local/bin:/home/authors:/opt/conda/envs/LSST_Stack_2024/lib/python3.11",
                  "/opt/lsst/software/stack/conda/envs/lsst-scipipe-9.0.0/share", "en_US.UTF-8", "w_2026_48"):
        assert scrub(value) == value
    assert environment({"PYTHONPATH": "/x:https://u:hunter2@h/y"}) == {"PYTHONPATH": f"/x:https://{REDACTED}@h/y"}


def test_records_are_sanitized_idempotently() -> None:
    fresh = context_record(env={**SECRETS, "PATH": "/usr/bin"})
    assert sanitize_record(fresh) == fresh  # so a fresh record keeps its hash
    assert fresh["env"] == {"PATH": "/usr/bin"} and fresh["env_names"] == sorted(SECRETS)
    # a record as an older batchprod wrote it: every value whose name did not look secret
    old = {"host": "h", "env": {**SECRETS, "DB_PASSWORD": REDACTED, "PATH": "/usr/bin:/x/" + SECRETS["GITHUB_PAT"]}}
    clean = sanitize_record(old)
    assert clean["env"] == {"PATH": f"/usr/bin:/x/{REDACTED}"} and clean["env_names"] == sorted(SECRETS)
    text = str(clean)
    assert not any(v in text for v in SECRETS.values())


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
