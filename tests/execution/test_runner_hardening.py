"""Bad input and bad actors never hurt a run (issue 8): the job wrapper's side.

Command injection through template values, shell semantics of task commands, kills of the payload,
fencing of superseded attempts, and storage failures at publication.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from batchprod.execution.run import prepare
from batchprod.execution.runner import render_command
from batchprod.testing import command_task, make_toy_repo, write_submit
from batchprod.wms.local import LocalExecutor

ONE = {"visits": (1,), "detectors": (0,)}

# values that run code if pasted into a shell command unquoted, or quoted in the wrong place
EVIL = [
    "'; touch {pwned}; echo '",
    '"; touch {pwned}; echo "',
    "$(touch {pwned})",
    "`touch {pwned}`",
    "a\ntouch {pwned}",
    "x; touch {pwned}",
    "\\",
    "\\'; touch {pwned}; #",
    "*",
    "-n",
    "",
]

# templates that take a value as a plain word: accepted, and the value arrives as one word
ACCEPTED = [
    "printf '%s\\n' {config.v} > {outputs.calexp}",
    "printf '%s\\n' \"$(printf '%s' {config.v})\" > {outputs.calexp}",
    "(cd / && printf '%s\\n' {config.v}) > {outputs.calexp}",
    "cat <<EOF > /dev/null\nliteral {{text}}\nEOF\nprintf '%s\\n' {config.v} > {outputs.calexp}",
    "x={config.v}; printf '%s\\n' \"$x\" > {outputs.calexp}",
    "[ {config.v} = never ] || printf '%s\\n' {config.v} > {outputs.calexp}",
    "printf '%s\\n' {config.v} | cat > {outputs.calexp}  # a comment with a quote: it's fine",
]

# templates where a quoted value would not be one plain word: refused at render
REFUSED = [
    ("echo '{config.v}'", "inside single quotes"),
    ('echo "{config.v}"', "inside double quotes"),
    ("echo \"$(echo '{config.v}')\"", "inside single quotes"),
    ("cat <<EOF\n{config.v}\nEOF", "inside a here-document"),
    ("echo hi # {config.v}", "inside a comment"),
    ("echo $(( {config.v} + 1 ))", "inside an arithmetic expression"),
    ("(( {config.v} > 1 ))", "inside an arithmetic expression"),
    ("[[ {config.v} -eq 1 ]]", "inside [[ ... ]]"),
    ("a[{config.v}]=1", "inside an array subscript"),
    ("echo ${{x:-{config.v}}}", "inside ${...}"),
    ("echo `echo {config.v}`", "inside backquotes"),
    ("echo \\{config.v}", "right after a backslash"),
    ("echo ${config.v}", "right after a '$'"),
    ("echo $'{config.v}'", "inside $'...' quotes"),
    ("\"$(case a in a) echo \"{config.v}\";; esac)\"", "cannot be followed safely"),
    ("echo {config.__class__}", "'__'"),
]


def _quantum(tmp_path: Path, value: str, data_id: dict | None = None) -> dict:
    return {"label": "calibrate", "data_id": data_id or {"visit": 1, "detector": 0}, "config": {"v": value},
            "inputs": [{"dataset_type": "raw", "data_id": {}, "path": str(tmp_path / "in put.txt")}],
            "outputs": [{"dataset_type": "calexp", "data_id": {}, "path": str(tmp_path / "out.txt")}]}


@pytest.mark.parametrize("template", ACCEPTED)
@pytest.mark.parametrize("evil", EVIL)
def test_values_are_one_word_and_never_code(tmp_path: Path, template: str, evil: str) -> None:
    pwned = tmp_path / "pwned"
    value = evil.format(pwned=pwned)
    cmd = render_command(template, _quantum(tmp_path, value))
    p = subprocess.run(["/bin/bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True)
    assert not pwned.exists(), cmd
    if "[ " in template and value == "never":
        return
    assert p.returncode == 0, (cmd, p.stderr)
    assert (tmp_path / "out.txt").read_text() == value + "\n", cmd


@pytest.mark.parametrize(("template", "why"), REFUSED)
def test_placeholders_where_quoting_cannot_protect_are_refused(tmp_path: Path, template: str, why: str) -> None:
    with pytest.raises(ValueError, match="placeholder") as exc:
        render_command(template, _quantum(tmp_path, "x"))
    assert why in str(exc.value)


def test_label_data_id_and_paths_are_quoted(tmp_path: Path) -> None:
    q = _quantum(tmp_path, "v")
    q["label"] = "cal; touch pwned"
    cmd = render_command("printf '%s|' {label} {dataId} {visit:03d} {inputs.raw} > {outputs.calexp}", q)
    subprocess.run(["/bin/bash", "-c", cmd], cwd=tmp_path, check=True)
    assert not (tmp_path / "pwned").exists()
    assert (tmp_path / "out.txt").read_text() == f"cal; touch pwned|visit=1 detector=0|001|{tmp_path / 'in put.txt'}|"


def test_quoted_placeholder_is_a_config_error_at_prepare(tmp_path: Path) -> None:
    from batchprod.errors import ConfigError

    repo = make_toy_repo(tmp_path / "repo", **ONE)
    task = {**command_task(["visit", "detector"], ["raw"], ["calexp"], "echo '{config.v}' > {outputs.calexp}"),
            "config": {"v": "x"}}
    with pytest.raises(ConfigError, match="inside single quotes"):
        prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo))


def test_injection_through_task_config_runs_nothing(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    pwned = tmp_path / "pwned"
    value = f"x; touch {pwned}"
    task = {**command_task(["visit", "detector"], ["raw"], ["calexp"], "echo {config.v} > {outputs.calexp}"),
            "config": {"v": value}}
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo))
    assert LocalExecutor(run).execute() == "SUCCEEDED"
    assert not pwned.exists()
    (out,) = (repo / "toy" / "run" / "calexp").iterdir()
    assert out.read_text() == value + "\n"


# -- shell semantics: a failed or killed part of a command fails it ------------------------------------
def _one_command_job(tmp_path: Path, command: str, **keys) -> list[dict]:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], command)
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, numberOfRetries=0,
                               maxPreemptions=0, **keys))
    LocalExecutor(run).execute()
    return run.store.attempts(0)


@pytest.mark.parametrize("command", [
    "false | cat; cp {inputs.raw} {outputs.calexp}",  # a failed stage of a pipeline
    "false; cp {inputs.raw} {outputs.calexp}",  # a failed command of a sequence
    "cp {inputs.raw} {outputs.calexp}; echo $NOT_SET_ANYWHERE",  # an unset variable
    "set +e; cp {inputs.raw} {outputs.calexp}; false",  # strict mode turned off: the exit status still counts
])
def test_a_failed_part_of_a_command_fails_the_job(tmp_path: Path, command: str) -> None:
    (a,) = _one_command_job(tmp_path, command)
    assert (a["status"], a["failure_class"]) == ("FAILED", "user_error")
    assert "error: calibrate {'visit': 1, 'detector': 0}: command exited with code" in Path(a["stderr"]).read_text()


@pytest.mark.parametrize(("command", "sig"), [
    ("sh -c 'kill -KILL $$' | cat; cp {inputs.raw} {outputs.calexp}", signal.SIGKILL),
    ("sh -c 'kill -TERM $$'; cp {inputs.raw} {outputs.calexp}", signal.SIGTERM),
    ("cp {inputs.raw} {outputs.calexp}; sh -c 'kill -INT $$'", signal.SIGINT),
])
def test_payload_killed_inside_a_shell_job_is_killed_not_user_error(tmp_path: Path, command: str, sig: int) -> None:
    (a,) = _one_command_job(tmp_path, command)
    assert (a["failure_class"], a["signal"]) == ("killed", sig)
    assert f"payload killed by {signal.Signals(sig).name}" in Path(a["stderr"]).read_text()
    assert not list((tmp_path / "repo" / "toy" / "run").glob("calexp/*"))  # nothing published


def test_crash_by_signal_inside_a_shell_job_stays_user_error(tmp_path: Path) -> None:
    (a,) = _one_command_job(tmp_path, "sh -c 'kill -SEGV $$'; cp {inputs.raw} {outputs.calexp}")
    assert (a["failure_class"], a["exit_code"]) == ("user_error", 128 + signal.SIGSEGV)


def test_job_script_started_by_sh_runs_under_bash(tmp_path: Path) -> None:
    """Batch systems start the script with #!/bin/sh or 'sh -c': it re-runs itself under bash."""
    from batchprod.execution.runner import shell_script

    spec = {"quanta": [{"label": "c", "data_id": {"v": 1}, "command": "false | cat", "inputs": [], "outputs": []}]}
    p = subprocess.run(["/bin/sh", "-c", shell_script(spec, {})], capture_output=True, text=True)
    assert p.returncode == 1 and "command exited with code 1: false | cat" in p.stderr


@pytest.mark.parametrize(("command", "rc"), [
    ("false | cat", 1),
    ("false; true", 1),
    ("sh -c 'kill -KILL $$'", -signal.SIGKILL),  # the wrapper dies of the kill, as the payload did
    ("sh -c 'kill -TERM $$' | cat", -signal.SIGTERM),
    ("sh -c 'kill -HUP $$'; true", -signal.SIGHUP),
])
def test_python_wrapper_commands_are_strict_and_report_kills(command: str, rc: int) -> None:
    import sys

    code = f"from batchprod.execution.runner import _run_command; _run_command({command!r}, 'finalJob')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == rc, p.stderr


def test_final_job_payload_killed_is_killed(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"])}},
                               repo=repo, maxPreemptions=0, finalJob={"command": "sh -c 'kill -KILL $$' | cat"}))
    LocalExecutor(run).execute()
    final = run.store.attempts()[-1]
    assert (final["failure_class"], final["signal"]) == ("killed", signal.SIGKILL)


# -- resource use: the job's own, not the orchestrator's ------------------------------------------------
@pytest.fixture
def big_orchestrator():
    """Make this process (the orchestrator of in-process runs, the parent of wrappers) big, so that
    anything it leaks into its children's figures shows."""
    ballast = bytearray(300 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    yield ballast
    del ballast


def test_peak_rss_of_local_jobs_is_their_own(tmp_path: Path) -> None:
    import sys

    from batchprod.testing import start_orchestrator

    repo = make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0, 1, 2))
    # detector 0: a tiny job; 1: one process of ~400 MB for a moment (too short to be sampled);
    # 2: two processes of ~80 MB at once for a while (sampled as a tree) burning CPU
    alloc = f"{sys.executable} -c 'b = bytearray({{}} * 2**20); b[::4096] = b\"x\" * len(b[::4096]); {{}}'"
    hog = alloc.format(450, "")
    busy = alloc.format(80, "import time; t = time.process_time()\nwhile time.process_time() - t < 0.6: pass")
    cmd = (f"if [ {{detector}} = 1 ]; then {hog}; fi; "
           f"if [ {{detector}} = 2 ]; then {busy} & {busy}; wait; fi; cp {{inputs.raw}} {{outputs.calexp}}")
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], cmd)
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, requestMemory=2000))
    assert start_orchestrator(run.submit_dir).wait(60) == 0  # an orchestrator of its own: a known size
    assert run.store.run_info()["status"] == "SUCCEEDED"
    by_det = {a["job_id"]: a for a in run.store.attempts()}
    names = {j["id"]: j["name"] for j in run.store.jobs()}
    peak = {names[j][-1]: a["peak_rss_mb"] for j, a in by_det.items()}
    cpu = {names[j][-1]: a["cpu_s"] for j, a in by_det.items()}
    assert peak["0"] is None or peak["0"] < 30, peak  # was the orchestrator's (~65 MB)
    assert 450 <= peak["1"] < 600, peak
    assert 160 <= peak["2"] < 300, peak  # both processes at once
    assert cpu["2"] >= 1.0 and cpu["0"] < 0.5, cpu


def test_python_wrapper_reports_its_own_peak(tmp_path: Path, big_orchestrator) -> None:
    import json
    import sys

    out = tmp_path / "out.txt"
    spec = {"name": "j", "attempt": 1, "repo": str(tmp_path), "output_run": "run",
            "result_path": str(tmp_path / "j.1.result.json"), "usage_path": str(tmp_path / "usage.json"),
            "quanta": [{"label": "t", "data_id": {"visit": 1}, "node_id": "n", "python": "batchprod.testing:alloc_task",
                        "command": None, "config": {"mb": 20, "hold": 0}, "inputs": [],
                        "outputs": [{"dataset_type": "calexp", "data_id": {"visit": 1}, "path": str(out)}]}]}
    p = subprocess.run([sys.executable, "-m", "batchprod.execution.runner"], input=json.dumps(spec), text=True,
                       capture_output=True)
    assert p.returncode == 0, p.stderr
    usage = json.loads((tmp_path / "usage.json").read_text())
    assert 20 < usage["peak_rss_mb"] < 250, usage  # its own (imports + 20 MB), not this process's 300+ MB
