"""Bad input and bad actors never hurt a run (issue 8): the job wrapper's side.

Command injection through template values, shell semantics of task commands, kills of the payload,
fencing of superseded attempts, and storage failures at publication.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import pytest

from batchprod.engine.control import LocalExecutor
from batchprod.engine.prepare import prepare
from batchprod.execution.commands import render_command
from batchprod.testing import command_task, make_toy_repo, write_submit

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
    ("let {config.v}", "an argument of 'let'"),  # arithmetic: 'a[$(cmd)]' would run cmd
    ("x=(1 {config.v})", "a '(' inside a word"),  # an array assignment
    # found by fuzzing: '][' is a glob word, not a subscript, so the here-document is real
    ("][ <<EOF\n <<EOF\n\tEOF\n ]]{config.v}", "inside a here-document"),
    ("(echo a)#b {config.v}", "inside a comment"),  # a comment after a subshell, not after $(...)
    ("cat <<EOF\nx\\\nEOF\n{config.v}", "cannot be followed safely"),  # 'x\<newline>EOF' does not end it
    ("echo [[ # it's\n '\n ]] {config.v} '", "cannot be followed safely"),
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


def test_random_templates_never_run_a_value(tmp_path: Path) -> None:
    """Templates glued from shell fragments at random: whatever is accepted never runs a value."""
    import random

    frags = ["'", '"', "\\", "$(", ")", "(", "`", "#", "\n", " <<EOF\n", "\nEOF\n", " <<-EOF\n", "\tEOF\n",
             "case x in x)", ";;", " esac", "${{", "}}", "$((", "))", "((", "[[ ", " ]]", "[", "]", "a[", "<(", "echo ",
             " ", ";", "{config.v}", "{config.v}", "$", "a=", "|", "&&", "<<<", "$'", "(echo )", "x", "1"]
    evils = ["x'; touch PWNED; '", 'x"; touch PWNED; "', "$(touch PWNED)", "`touch PWNED`", "a\ntouch PWNED\n",
             "1 ]] || touch PWNED; [[ 1", "a[$(touch PWNED)]", "EOF\ntouch PWNED\nEOF", "x)\ntouch PWNED\n"]
    rnd = random.Random(8)
    runs = 0
    for _ in range(600):
        t = "".join(rnd.choice(frags) for _ in range(rnd.randint(2, 8)))
        try:
            cmds = [render_command(t, _quantum(tmp_path, e)) for e in evils]
        except (ValueError, KeyError, IndexError, AttributeError):
            continue
        for cmd in cmds:
            runs += 1
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["/bin/bash", "-c", cmd], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=5)
            assert not (tmp_path / "PWNED").exists(), (t, cmd)
    assert runs > 100


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


@pytest.mark.parametrize("template", ["echo final '{v}'", 'echo final "{v}"', "echo final {v}"])
def test_a_variable_in_the_final_jobs_command_cannot_inject_code(tmp_path: Path, template: str) -> None:
    """A native finalJob.command takes a variable's value only as one plain word, whatever quotes the
    placeholder stands in; a plain word still works."""
    from batchprod.errors import ConfigError

    repo = make_toy_repo(tmp_path / "repo", **ONE)
    pwned = tmp_path / "pwned"
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], "cp {inputs.raw} {outputs.calexp}")
    for value in (f"'; touch {pwned}; echo '", f'"; touch {pwned}; echo "', f"x; touch {pwned}", "$(id)"):
        with pytest.raises(ConfigError, match=r"key 'finalJob.command': variable \{v\} is .* not a plain word"):
            prepare(write_submit(tmp_path / "a", {"tasks": {"calibrate": task}}, repo=repo, variables={"v": value},
                                 finalJob={"command": template}))
    run = prepare(write_submit(tmp_path / "b", {"tasks": {"calibrate": task}}, repo=repo,
                               variables={"v": "catalog-v2.fits"}, finalJob={"command": template + f" > {pwned}.ok"}))
    assert LocalExecutor(run).execute() == "SUCCEEDED"
    assert Path(f"{pwned}.ok").read_text() == "final catalog-v2.fits\n" and not pwned.exists()


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
    assert "error: calibrate visit=1 detector=0: command exited with code" in Path(a["stderr"]).read_text()


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


def test_job_script_is_strict_under_bash_and_every_backend_starts_bash(tmp_path: Path) -> None:
    """The job script needs bash (pipefail): local and Parsl run 'bash -c', Slurm's batch script is #!/bin/bash."""
    import inspect

    from batchprod.execution.commands import BASH, shell_script
    from batchprod.wms.local import backend as local_backend
    from batchprod.wms.parsl import ParslBackend
    from batchprod.wms.slurm import SlurmBackend

    spec = {"quanta": [{"label": "c", "data_id": {"v": 1}, "command": "false | cat", "inputs": [], "outputs": []}]}
    p = subprocess.run([BASH, "-c", shell_script(spec, {})], capture_output=True, text=True)
    assert p.returncode == 1 and "command exited with code 1: false | cat" in p.stderr
    assert '"#!/bin/bash' in inspect.getsource(SlurmBackend.batch_script)
    assert "[BASH, \"-c\", script]" in inspect.getsource(ParslBackend)
    assert "[BASH, \"-c\", script]" in inspect.getsource(local_backend)


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
    # the default disposition of the signals sent (a test run under nohup ignores SIGHUP, and an
    # ignored signal kills nothing: the payload would exit 0)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
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


# -- fencing: a superseded attempt never publishes over its replacement ---------------------------------
def _job_spec(tmp_path: Path, attempt: int, python: str | None = None) -> dict:
    logs = tmp_path / "submit" / "logs" / "calibrate"
    logs.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "repo" / "run" / "calexp" / "calexp_visit1.txt"
    q = {"label": "calibrate", "data_id": {"visit": 1}, "node_id": "n1", "command": None if python else "true",
         "python": python, "config": {"mb": 1, "hold": 0}, "inputs": [],
         "outputs": [{"dataset_type": "calexp", "data_id": {"visit": 1}, "path": str(out)}]}
    return {"name": "calibrate_visit1", "attempt": attempt, "repo": str(tmp_path / "repo"), "output_run": "run",
            "result_path": str(logs / f"calibrate_visit1.{attempt}.result.json"), "quanta": [q]}


def _stage(spec: dict, text: str) -> list[dict]:
    from batchprod.execution.protocol import collect_outputs, staging_map

    staged = staging_map(spec)
    for st in staged.values():
        Path(st).parent.mkdir(parents=True, exist_ok=True)
        Path(st).write_text(text)
    return [o for q in spec["quanta"] for o in collect_outputs(q, staged)]


def _final(spec: dict) -> Path:
    return Path(spec["quanta"][0]["outputs"][0]["path"])


def test_superseded_attempt_cannot_publish_over_its_replacement(tmp_path: Path) -> None:
    from batchprod.execution.protocol import FencedOff, finish_attempt, staging_map, write_fence

    old, new = _job_spec(tmp_path, 1), _job_spec(tmp_path, 2)
    old_outputs = _stage(old, "attempt 1\n")  # the zombie: its payload is done, post-job not yet
    write_fence(new["result_path"], 2)  # recovery starts attempt 2
    finish_attempt(new, _stage(new, "attempt 2\n"), 0.1)
    published = _final(new).stat()
    with pytest.raises(FencedOff, match="attempt 1 was superseded by attempt 2"):
        finish_attempt(old, old_outputs, 0.1)
    assert _final(new).read_text() == "attempt 2\n" and _final(new).stat() == published  # untouched
    assert not Path(old["result_path"]).exists() and not Path(old["result_path"] + ".pending").exists()
    assert Path(new["result_path"]).exists()
    assert not any(Path(p).exists() for p in staging_map(old).values())  # it cleaned up after itself


def test_superseded_pending_manifest_is_not_rolled_forward(tmp_path: Path) -> None:
    """Attempt 1 wrote its manifest and stalled before publishing (or a restart finds it): once
    attempt 2 was started, committing attempt 1's manifest publishes nothing."""
    from batchprod.execution.protocol import (
        FencedOff,
        _write_json,
        commit_outputs,
        finish_attempt,
        write_fence,
    )

    old, new = _job_spec(tmp_path, 1), _job_spec(tmp_path, 2)
    _write_json(old["result_path"] + ".pending", {"outputs": _stage(old, "attempt 1\n"), "attempt": 1}, direct=True)
    write_fence(new["result_path"], 2)
    finish_attempt(new, _stage(new, "attempt 2\n"), 0.1)
    with pytest.raises(FencedOff):
        commit_outputs(old["result_path"])
    assert _final(new).read_text() == "attempt 2\n"
    assert not Path(old["result_path"]).exists() and not Path(old["result_path"] + ".pending").exists()


def test_publication_waits_for_an_older_attempt_already_publishing(tmp_path: Path) -> None:
    """Check and publication are one step: an attempt that passed the check before its replacement
    started finishes publishing first, and the replacement publishes after it."""
    import sys
    import time

    from batchprod.execution.protocol import fence_path, finish_attempt, write_fence

    new = _job_spec(tmp_path, 2)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({fence_path(new['result_path'], 2)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(1.0)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    write_fence(new["result_path"], 2)
    t0 = time.monotonic()
    finish_attempt(new, _stage(new, "attempt 2\n"), 0.1)
    assert time.monotonic() - t0 > 0.5
    holder.wait()
    assert _final(new).read_text() == "attempt 2\n"


def test_zombie_python_wrapper_is_fenced_off(tmp_path: Path) -> None:
    import json
    import sys

    from batchprod.execution.protocol import EXIT_INFRASTRUCTURE, finish_attempt, staging_map, write_fence

    old, new = _job_spec(tmp_path, 1, python="batchprod.testing:alloc_task"), _job_spec(tmp_path, 2)
    write_fence(new["result_path"], 2)
    finish_attempt(new, _stage(new, "attempt 2\n"), 0.1)
    p = subprocess.run([sys.executable, "-m", "batchprod.execution.runner"], input=json.dumps(old), text=True,
                       capture_output=True)
    assert p.returncode == EXIT_INFRASTRUCTURE
    assert "error: fenced off: attempt 1 was superseded by attempt 2" in p.stderr
    assert _final(new).read_text() == "attempt 2\n" and not Path(old["result_path"]).exists()
    assert not any(Path(s).exists() for s in staging_map(old).values())


def test_every_backend_start_fences_off_earlier_attempts(tmp_path: Path) -> None:
    """Whoever starts an attempt after the first writes the job's fence first (local: inline and
    through the wrapper; Slurm and Parsl share the same planning step)."""
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    task = command_task(["visit", "detector"], ["raw"], ["calexp"],
                        'test "$BATCHPROD_ATTEMPT" -ge 3; cp {inputs.raw} {outputs.calexp}')
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, numberOfRetries=2))
    assert LocalExecutor(run).execute() == "SUCCEEDED"
    (fence,) = (run.submit_dir / "logs" / "calibrate").glob("*.fence")
    assert fence.read_text().split() == ["2", "3"]


# -- storage failures at publication are infrastructure, not the payload's fault ------------------------
@pytest.mark.parametrize("where", ["manifest", "publish", "commit", "staging"])
def test_storage_failure_in_the_wrapper_is_infrastructure(tmp_path: Path, monkeypatch, capsys, where: str) -> None:
    import errno
    import os

    from batchprod.execution import protocol, runner

    spec = _job_spec(tmp_path, 1, python="batchprod.testing:alloc_task")
    real_replace = os.replace

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "manifest":
        monkeypatch.setattr(protocol, "_write_json", full)
    elif where == "publish":
        monkeypatch.setattr(os, "replace", lambda a, b: full() if "calexp" in str(b) else real_replace(a, b))
    elif where == "commit":
        monkeypatch.setattr(os, "replace", lambda a, b: full() if str(b).endswith(".result.json") else real_replace(a, b))
    else:  # a read-only or broken repository: the staging directory cannot be made
        (tmp_path / "repo" / "run").mkdir(parents=True)
        (tmp_path / "repo" / "run" / "_staging").write_text("not a directory")
    assert runner._main(spec) == runner.EXIT_INFRASTRUCTURE
    assert "error: stage-" in capsys.readouterr().err
    assert not Path(spec["result_path"]).exists()


def test_storage_failure_in_inline_post_job_is_infrastructure(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    repo = make_toy_repo(tmp_path / "repo", **ONE)
    real_replace = os.replace

    def replace(a, b):
        if "/toy/run/calexp/" in str(b):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(a, b)

    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"])}},
                               repo=repo, numberOfRetries=0, maxInfraRetries=0))
    monkeypatch.setattr(os, "replace", replace)
    LocalExecutor(run).execute()
    (a,) = run.store.attempts(0)
    assert a["failure_class"] == "infrastructure"
    assert "Read-only file system" in Path(a["stderr"]).read_text()


def test_logs_that_cannot_be_opened_end_the_attempt_as_infrastructure(tmp_path: Path) -> None:
    from batchprod.execution.protocol import EXIT_INFRASTRUCTURE
    from batchprod.wms.base import Launch
    from batchprod.wms.local.backend import LocalBackend

    spec = _job_spec(tmp_path, 1)
    nowhere = tmp_path / "gone" / "calibrate_visit1.1"
    launch = Launch(0, "calibrate_visit1", "calibrate", 1, 1, 100, 0, spec, Path(f"{nowhere}.out"),
                    Path(f"{nowhere}.err"), Path(spec["result_path"]))
    backend = LocalBackend()
    assert backend.start([launch]) == ["-"]
    (ended,) = backend.poll()
    assert ended.exit_code == EXIT_INFRASTRUCTURE and "cannot open the attempt's logs" in (ended.reason or "")


def test_a_full_disk_at_start_goes_to_the_engine(tmp_path: Path, monkeypatch) -> None:
    """A full or read-only disk met while starting an attempt would meet every attempt: it is raised
    to the engine (which stops the run cleanly, no retry budget spent), not one infrastructure end
    per attempt."""
    import errno
    import os

    from batchprod.wms.base import Launch
    from batchprod.wms.local.backend import LocalBackend

    spec = _job_spec(tmp_path, 2)
    out, err, result = (Path(spec["result_path"].replace(".result.json", x)) for x in (".out", ".err", ".result.json"))
    launch = Launch(0, "calibrate_visit1", "calibrate", 2, 1, 100, 0, spec, out, err, result)
    real_open = os.open

    def full(path, *a, **k):
        if str(path).endswith(".fence"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(OSError, match="No space left"):
        LocalBackend().start([launch])


def test_env_variables_in_a_command_are_left_for_the_jobs_shell(tmp_path, toy_repo, monkeypatch) -> None:
    """${NAME} is expanded by the job's shell when it runs: never baked into the submit directory."""
    from batchprod.engine.control import LocalExecutor
    from batchprod.engine.prepare import prepare
    from batchprod.testing import command_task, write_submit

    monkeypatch.setenv("BP_TEST_SECRETISH", "s3cr3t-value")
    cmd = "echo ${BP_TEST_SECRETISH} > {outputs.calexp}"
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], cmd)}}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, payload={"dataQuery": "visit = 1 AND detector = 0"}))
    assert LocalExecutor(run).execute() == "SUCCEEDED"
    (out,) = (toy_repo / "toy" / "run" / "calexp").iterdir()
    assert out.read_text().strip() == "s3cr3t-value"
    for p in run.submit_dir.rglob("*"):
        if p.is_file() and not p.name.endswith((".out", ".err")):
            assert b"s3cr3t-value" not in p.read_bytes(), p
