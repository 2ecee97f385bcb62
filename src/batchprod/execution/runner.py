"""The job wrapper that runs on the compute side, in three phases.

* pre-job: stage-in check (every input exists, else an ``infrastructure`` failure);
* in-job: every quantum of the job runs its Python function or shell command, writing its outputs
  into an attempt-scoped staging directory (later quanta of the job read them there);
* post-job: outputs are checksummed, a manifest is written (``.pending``), outputs are renamed into
  place, and the manifest is committed (renamed to ``result.json``). A killed attempt leaves at most
  staged files nobody reads; a kill during publication is rolled forward by restart.

Started as ``python -m batchprod.execution.runner`` with the job spec (JSON) on stdin.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
import shlex
import signal
import string
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from batchprod.pipeline.context import QuantumContext, Ref

#: exit code for a payload that raised MemoryError: reported as ``oom``
EXIT_MEMORY_ERROR = 86
#: exit code when a quantum claims success but did not write an output: ``user_error``
EXIT_MISSING_OUTPUT = 87
#: exit code for stage-in or stage-out failure: ``infrastructure``
EXIT_INFRASTRUCTURE = 89
#: payload signals that mean "stopped from outside" rather than "crashed"
KILL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class StageError(Exception):
    """Stage-in or stage-out failed: the data system's fault, not the payload's."""


def file_checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_function(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _staged(spec: dict[str, Any], r: dict[str, Any], attempt: Any) -> str:
    """Where an attempt writes an output before publication: ``<run>/_staging/<type>/<name>.a<N><ext>``
    (flat per dataset type: no directory to create or remove per job)."""
    stem, ext = os.path.splitext(os.path.basename(r["path"]))
    return os.path.join(spec["repo"], spec["output_run"], "_staging", r["dataset_type"], f"{stem}.a{attempt}{ext}")


def _local(q: dict[str, Any], staged: dict[str, str]) -> dict[str, Any]:
    """The quantum with outputs pointing into staging and inputs made in this job read from there."""
    return {
        **q,
        "inputs": [{**r, "path": staged.get(r["path"], r["path"])} for r in q["inputs"]],
        "outputs": [{**r, "path": staged[r["path"]]} for r in q["outputs"]],
    }


def _context(q: dict[str, Any]) -> QuantumContext:
    inputs: dict[str, list[Ref]] = {}
    for r in q["inputs"]:
        inputs.setdefault(r["dataset_type"], []).append(Ref(r["dataset_type"], r["data_id"], Path(r["path"])))
    outputs = {r["dataset_type"]: Ref(r["dataset_type"], r["data_id"], Path(r["path"])) for r in q["outputs"]}
    return QuantumContext(q["label"], q["data_id"], inputs, outputs, q.get("config") or {})


class _Paths(list):  # type: ignore[type-arg]
    """Input or output paths of one dataset type: rendered as one shell word per path."""


_BREAKS = frozenset(" \t\n;&|()<>")  # the shell's metacharacters: a word (and a comment) starts after one
_CMD = ("cmd", "paren", "dparen")  # contexts where a shell-quoted value is one plain word
_WHERE = {"sq": "inside single quotes", "ansi": "inside $'...' quotes", "dq": "inside double quotes",
          "bt": "inside backquotes", "brace": "inside ${...}", "arith": "inside an arithmetic expression",
          "arith_b": "inside an arithmetic expression", "dbracket": "inside [[ ... ]]",
          "subscript": "inside an array subscript", "comment": "inside a comment",
          "let": "an argument of 'let' (evaluated as arithmetic)"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _QuoteScan:
    """Follows the shell's quoting through the literal text of a command template, so that every
    placeholder can be checked to stand where a shell-quoted word is just a word: not inside quotes,
    ``${...}``, backquotes, arithmetic, ``[[ ]]``, a comment or a here-document (there a quoted value
    would break out, be evaluated, or end the comment at a newline it holds).

    It errs one way only: where the shell's reading could differ from its own (a 'case' inside
    ``$(...)``, a newline or here-document inside ``[[ ]]``, arithmetic or backquotes, ...) it stops
    following and refuses every later placeholder. Refusing a template is safe; running a value as
    code is not."""

    def __init__(self) -> None:
        # contexts: [kind, counter ('case' words, or paren depth), what 'prev' becomes when it closes]
        self.stack: list[list[Any]] = [["cmd", 0, "\n"]]
        self.prev = "\n"  # the last character read: a word starts after a metacharacter
        self.word = ""  # the current plain word (to see 'case' and assignments)
        self.escape = False  # a backslash waits for its character
        self.dollar = False  # a '$' waits for its character
        self.heredocs: list[tuple[str, bool]] = []  # announced here-documents: (delimiter, strip tabs)
        self.body: tuple[str, bool] | None = None  # the here-document being read
        self.line = ""
        self.lost: str | None = None

    def problem(self) -> str | None:
        """Why a placeholder cannot stand here (None: it can)."""
        if self.lost:
            return f"in a part of the template that cannot be followed safely ({self.lost})"
        if self.body is not None:
            return "inside a here-document"
        if self.escape:
            return "right after a backslash"
        if self.dollar:
            return "right after a '$'"
        kind = self.stack[-1][0]
        return None if kind in _CMD else _WHERE.get(kind, f"inside {kind}")

    def placeholder(self) -> None:
        self.prev, self.word, self.line = "a", self.word + "\0", self.line + "\0"

    def feed(self, s: str) -> None:
        i, n = 0, len(s)
        self.dollar = False
        while i < n and not self.lost:
            i = self._step(s, i, n)

    def _push(self, kind: str, closes_word: bool = False) -> None:
        """Enter a context; when it closes, the word goes on (``$(...)``) or ends (``(...)``)."""
        self.stack.append([kind, 0, ")" if closes_word else "a"])
        self.word = ""  # a new context starts a new word (so 'case' right after '$(' is seen)

    def _pop(self) -> None:
        self.prev = self.stack.pop()[2]

    def _dollar(self, s: str, i: int, n: int) -> int:
        """At a '$' (quoted or not): what it opens. Returns the index after what it consumed."""
        nxt = s[i + 1] if i + 1 < n else None
        if nxt is None:
            self.dollar = True
            return i + 1
        if nxt == "(":
            if i + 2 < n and s[i + 2] == "(":
                self._push("arith")
                return i + 3
            self._push("dparen")
            return i + 2
        if nxt == "{":
            self._push("brace")
            return i + 2
        if nxt == "[":
            self._push("arith_b")
            return i + 2
        if nxt in "$#?!-@*0123456789":
            return i + 2
        return i + 1

    def _step(self, s: str, i: int, n: int) -> int:  # noqa: C901, PLR0911, PLR0912, PLR0915 (one state machine)
        c = s[i]
        nxt = s[i + 1] if i + 1 < n else None
        if self.body is not None:  # here-document: lines until the delimiter
            if c == "\n":
                delim, strip = self.body
                if self.line.endswith("\\"):  # joined to the next line: where does the body end?
                    self.lost = "a line continuation in a here-document"
                elif (self.line.lstrip("\t") if strip else self.line) == delim:
                    self.body = self.heredocs.pop(0) if self.heredocs else None
                self.line = ""
            else:
                self.line += c
            return i + 1
        top = self.stack[-1]
        kind = top[0]
        if self.escape:
            self.escape, self.prev = False, "a"
            return i + 1
        if kind == "sq":
            if c == "'":
                self._pop()
            return i + 1
        if kind == "comment":
            if c == "\n":
                self.stack.pop()
                return i  # the newline again, in the enclosing context
            return i + 1
        if c == "\\":
            self.escape = True
            return i + 1
        if kind == "ansi":
            if c == "'":
                self._pop()
            return i + 1
        if kind == "bt":  # only its end is looked for: a command inside is not followed
            if c == "`":
                self._pop()
            elif c == "\n" or (c == "#" and self.prev in _BREAKS) or (c == "<" and nxt == "<"):
                self.lost = "a newline, comment or here-document inside backquotes"
            self.prev = c
            return i + 1
        if kind == "dq" or (kind == "brace" and any(k[0] == "dq" for k in self.stack)):
            if c == '"':
                if kind == "dq":
                    self._pop()
                else:
                    self._push("dq")
            elif c == "$":
                return self._dollar(s, i, n)
            elif c == "`":
                self._push("bt")
            elif c == "}" and kind == "brace":
                self._pop()
            return i + 1
        if kind == "subscript" and c in _BREAKS:  # the word ends: it was not an assignment
            self.stack.pop()
            return i
        if kind == "let" and c in ";&|)\n":  # the end of the 'let' command
            self.stack.pop()
            return i
        if kind in ("arith", "arith_b", "dbracket", "let") and (
                c == "\n" or (c == "#" and self.prev in _BREAKS) or (c == "<" and nxt == "<")):
            # 'a newline or a comment here: the shell may not be reading what this scan thinks
            self.lost = "a newline, comment or here-document inside arithmetic or [[ ]]"
            return i + 1
        if kind in ("brace", "arith", "arith_b", "dbracket", "subscript", "let"):
            if c in "'\"":
                self._push("sq" if c == "'" else "dq")
            elif c == "$":
                return self._dollar(s, i, n)
            elif c == "`":
                self._push("bt")
            elif kind == "brace" and c == "}":
                self._pop()
            elif kind == "arith" and c == "(":
                top[1] += 1
            elif kind == "arith" and c == ")":
                if top[1]:
                    top[1] -= 1
                elif nxt == ")":
                    self._pop()
                    return i + 2
                else:
                    self.lost = "unbalanced ')' in an arithmetic expression"
            elif kind in ("arith_b", "subscript") and c == "[":
                top[1] += 1
            elif kind in ("arith_b", "subscript") and c == "]":
                if top[1]:
                    top[1] -= 1
                else:
                    self._pop()
            elif kind == "dbracket" and c == "]" and nxt == "]":
                self._pop()
                return i + 2
            self.prev = c if c in _BREAKS else "a"
            return i + 1
        # command context: cmd (top level), paren ((...)), dparen ($(...), <(...), >(...))
        start = self.prev in _BREAKS
        consumed = i + 1
        let = False
        if c in _BREAKS:
            if self.word == "case":
                top[1] += 1
            let = self.word == "let" and c in " \t"  # its arguments are arithmetic, evaluated
            self.word = ""
        if c == "'":
            self._push("sq")
        elif c == '"':
            self._push("dq")
        elif c == "`":
            self._push("bt")
        elif c == "$":
            if nxt == "'":
                self._push("ansi")
                consumed = i + 2
            elif nxt == '"':
                self._push("dq")
                consumed = i + 2
            else:
                consumed = self._dollar(s, i, n)
        elif c == "(":
            if start and nxt == "(":
                self._push("arith", closes_word=True)
                consumed = i + 2
            elif self.prev in "<>":  # <(...), >(...): a word, like $(...)
                self._push("dparen")
            elif start:  # a subshell: a new word after it
                self._push("paren", closes_word=True)
            else:
                self.lost = "a '(' inside a word (an array assignment, a pattern)"
        elif c == ")":
            if kind in ("paren", "dparen"):
                if top[1]:  # a 'case' pattern or the end of (...): cannot tell which
                    self.lost = "a 'case' inside $(...) or (...)"
                else:
                    self._pop()
                    return i + 1
        elif c == "[":
            if start and nxt == "[":
                self._push("dbracket", closes_word=True)
                consumed = i + 2
            elif _IDENT.fullmatch(self.word):  # name[...]: an array subscript, evaluated as arithmetic
                self._push("subscript")
                return i + 1
        elif c == "#" and start:
            self._push("comment")
        elif c == "<" and nxt == "<":
            # '<<<' is a here-string (its word is an ordinary word); '<<' a here-document
            consumed = i + 3 if i + 2 < n and s[i + 2] == "<" else self._heredoc(s, i + 2, n)
        elif c == "\n" and self.heredocs:
            if len(self.stack) > 1:
                self.lost = "a here-document inside (...) or $(...)"
            self.body = self.heredocs.pop(0)
            self.line = ""
        if c not in _BREAKS and c not in "'\"`$[" and consumed == i + 1:
            self.word += c
        self.prev = s[consumed - 1]
        if let:
            self._push("let")
        return consumed

    def _heredoc(self, s: str, i: int, n: int) -> int:
        """After '<<': note the here-document's delimiter (its body starts at the next newline)."""
        strip = i < n and s[i] == "-"
        i += strip
        while i < n and s[i] in " \t":
            i += 1
        delim = ""
        while i < n and s[i] not in _BREAKS:
            c = s[i]
            if c in "'\"":
                end = s.find(c, i + 1)
                if end < 0:
                    break
                delim += s[i + 1 : end]
                i = end + 1
            elif c == "\\" and i + 1 < n:
                delim += s[i + 1]
                i += 2
            else:
                delim += c
                i += 1
        if not delim or i >= n:
            self.lost = "a here-document whose delimiter cannot be read"
        self.heredocs.append((delim, strip))
        return i


@functools.lru_cache(maxsize=1024)
def check_template(template: str) -> None:
    """Raise ValueError if a placeholder of a command template stands where a shell-quoted value
    would not be one plain word (inside quotes, ``${...}``, a here-document, ...)."""
    scan = _QuoteScan()
    for literal, field, _, _ in string.Formatter().parse(template):
        scan.feed(literal)
        if field is None:
            continue
        if "__" in field:
            raise ValueError(f"placeholder {{{field}}}: names with '__' are not allowed")
        where = scan.problem()
        if where:
            raise ValueError(
                f"placeholder {{{field}}} is {where}: every value is shell-quoted for you, so a placeholder "
                f"must be a plain word of the command, not in quotes, a comment, a here-document, ${{...}}, "
                f"$((...)) or [[ ]] (write echo {{{field}}}, not echo '{{{field}}}' or \"{{{field}}}\")")
        scan.placeholder()


class _ShellFormatter(string.Formatter):
    """Formats every value, then shell-quotes it: a value is always one word, never code."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, _Paths):
            return " ".join(shlex.quote(format(p, format_spec)) for p in value)
        return shlex.quote(format(value, format_spec))


_FORMATTER = _ShellFormatter()


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_command(template: str, q: dict[str, Any]) -> str:
    """Fill a command template: {inputs.TYPE}, {outputs.TYPE}, {config.KEY}, {dataId}, {label},
    {<dimension>}. Every value is shell-quoted (one word however it is spelt), and a template with a
    placeholder inside quotes, ``${...}``, a here-document, ... is refused with ValueError.
    ``${NAME}`` (an environment variable) is left for the job's shell to expand at run time."""
    template = _ENV_REF.sub(r"${{\1}}", template)
    check_template(template)
    ins: dict[str, _Paths] = {}
    for r in q["inputs"]:
        ins.setdefault(r["dataset_type"], _Paths()).append(r["path"])
    outs: dict[str, _Paths] = {}
    for r in q["outputs"]:
        outs.setdefault(r["dataset_type"], _Paths()).append(r["path"])
    fields: dict[str, Any] = {
        "inputs": SimpleNamespace(**ins),
        "outputs": SimpleNamespace(**outs),
        "config": SimpleNamespace(**(q.get("config") or {})),
        "dataId": " ".join(f"{k}={v}" for k, v in q["data_id"].items()),
        "label": q["label"],
        **q["data_id"],
    }
    return _FORMATTER.vformat(template, (), fields)


def _kill_signal(rc: int) -> int | None:
    """The kill signal a command's status reports: -N from Python (killed itself), or 128+N from a
    shell whose payload was killed (None: an ordinary exit, or a signal that means a crash)."""
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    return sig if sig in KILL_SIGNALS else None


def _run_command(cmd: str, what: str) -> None:
    """Run one command with bash's strict mode (a failed or killed part of ``a; b`` or ``a | b``
    fails the command); a payload killed by a kill signal makes the wrapper die of it too."""
    print(f"+ {cmd}", flush=True)
    rc = subprocess.call([BASH, "-c", f"{STRICT}\n{cmd}"])
    if rc == 0:
        return
    sig = _kill_signal(rc)
    if sig is not None:
        # stopped from outside: die of the same signal so the orchestrator sees a kill, not an error
        print(f"error: {what}: payload killed by {signal.Signals(sig).name}", file=sys.stderr, flush=True)
        if sig != signal.SIGKILL:  # (its handler cannot be set)
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGKILL)  # the signal was blocked or ignored: still a kill
    code = rc if rc > 0 else 128 - rc
    print(f"error: {what}: command exited with code {code}: {cmd}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class MissingOutput(Exception):
    """A quantum ended well but did not write an output it declared."""


def collect_outputs(q: dict[str, Any], staged: dict[str, str]) -> list[dict[str, Any]]:
    """Output records of a finished quantum (final path, staged path, size, checksum)."""
    out = []
    for r in q["outputs"]:
        p = staged[r["path"]]
        try:
            size = os.stat(p).st_size
        except FileNotFoundError:
            raise MissingOutput(f"{q['label']} {q['data_id']}: output '{r['dataset_type']}' was not written: {p}") from None
        out.append({**r, "staged": p, "node_id": q["node_id"], "size": size, "checksum": file_checksum(p)})
    return out


FINAL_NODE = "finalJob"  # node id of the final job's outputs (it has no quantum); = FinalJob.NAME, not imported: the wrapper stays light


def final_outputs(final: dict[str, Any]) -> list[dict[str, Any]]:
    """Output records of the files the final job declared (written in place: it runs alone, last)."""
    out = []
    for r in final.get("outputs") or []:
        try:
            size = os.stat(r["path"]).st_size
        except FileNotFoundError:
            print(f"error: finalJob: declared output '{r['dataset_type']}' was not written: {r['path']}",
                  file=sys.stderr)
            raise SystemExit(EXIT_MISSING_OUTPUT) from None
        out.append({**r, "staged": r["path"], "node_id": FINAL_NODE, "size": size, "checksum": file_checksum(r["path"])})
    return out


def run_quantum(q: dict[str, Any], staged: dict[str, str]) -> list[dict[str, Any]]:
    """Run one quantum into staging; returns its output records (final and staged paths)."""
    lq = _local(q, staged)
    for r in lq["outputs"]:
        try:
            Path(r["path"]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(f"stage-in: cannot make the staging directory for {r['dataset_type']}: {exc}") from None
    if q.get("python"):
        load_function(q["python"])(_context(lq))
    else:
        _run_command(render_command(q["command"], lq), f"{q['label']} {q['data_id']}")
    try:
        return collect_outputs(q, staged)
    except MissingOutput as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_MISSING_OUTPUT) from None


def staging_map(spec: dict[str, Any]) -> dict[str, str]:
    """Final output path -> where this attempt stages it."""
    attempt = spec.get("attempt", 1)
    return {r["path"]: _staged(spec, r, attempt) for q in spec["quanta"] for r in q["outputs"]}


def _exit_trap() -> str:
    """The job script's EXIT trap: says which command failed, and makes a payload killed by a kill
    signal (the shell reports 128+N) kill the job's shell with it, so the backend sees a kill."""
    names = " ".join(f"{128 + int(s)}) _bp_sig={signal.Signals(s).name.removeprefix('SIG')};;"
                     for s in sorted(KILL_SIGNALS))
    resets = " ".join(signal.Signals(s).name.removeprefix("SIG") for s in sorted(KILL_SIGNALS) if s != signal.SIGKILL)
    return ("trap '_bp_rc=$?; set +eu; trap - EXIT; if [ $_bp_rc -ne 0 ]; then _bp_sig=; "
            f"case $_bp_rc in {names} esac; "
            'if [ -n "$_bp_sig" ]; then echo "error: $_bp_what: payload killed by SIG$_bp_sig: $_bp_cmd" >&2; '
            f"trap - {resets}; kill -s $_bp_sig $$; kill -s KILL $$; fi; "
            'echo "error: $_bp_what: command exited with code $_bp_rc: $_bp_cmd" >&2; fi; exit $_bp_rc\' EXIT')


BASH = "/bin/bash"
#: every task command runs with these: a failed or killed part of ``a; b`` or ``a | b`` fails it
STRICT = "set -euo pipefail"


def shell_script(spec: dict[str, Any], staged: dict[str, str]) -> str | None:
    """The job as one bash script when every quantum is a command (no Python to start): the local
    backend runs it directly, with the wrapper's pre/post steps done in the orchestrator. None if
    the job needs the Python wrapper.

    Each command runs under ``set -euo pipefail`` through ``eval`` (so a stray quote or here-document
    in one command cannot swallow the rest of the script); a trap names the failed command, and a
    payload killed by a kill signal kills the job with it (``killed``, not ``user_error``). It must be
    run by bash (``BASH -c``, ``#!/bin/bash``)."""
    if spec.get("final") or any(q.get("python") or not q.get("command") for q in spec["quanta"]):
        return None
    lines = ["_bp_what=job; _bp_cmd=", _exit_trap()]
    for q in spec["quanta"]:
        what = f"{q['label']} {q['data_id']}"
        cmd = render_command(q["command"], _local(q, staged))
        # the options again for every command: one may have changed them for the next
        lines.append(f"{STRICT}; _bp_what={shlex.quote(what)}; _bp_cmd={shlex.quote(cmd)}")
        lines.append(f"echo {shlex.quote('quantum ' + what)}")
        # (a command that turned 'set -e' off still fails the job by its own exit status)
        lines.append('eval "$_bp_cmd"\n_bp_rc=$?; if [ $_bp_rc -ne 0 ]; then exit $_bp_rc; fi')
    if spec.get("result_path"):
        # the commands finished well: a marker lets a restart finish post-job if the orchestrator died
        marker = shlex.quote(spec["result_path"] + ".exit")
        lines.append(f"_bp_what=post-job; _bp_cmd='write the completion marker'; printf 0 > {marker} "
                     f"|| exit {EXIT_INFRASTRUCTURE}")
    # every backend starts it with bash itself (local and Parsl: bash -c, Slurm: #!/bin/bash): no
    # re-exec guard, which made bash parse the script twice per job (~1 ms CPU a job)
    return "\n".join(lines) + "\n"


def complete_after_loss(spec: dict[str, Any]) -> bool:
    """Restart: finish post-job for a shell-script job whose commands completed (marker present)
    while no orchestrator was there to do it. True if the attempt is now committed."""
    marker = f"{spec['result_path']}.exit"
    try:
        with open(marker) as fh:
            if fh.read().strip() != "0":
                return False
    except OSError:
        return False
    staged = staging_map(spec)
    try:
        outputs = [o for q in spec["quanta"] for o in collect_outputs(q, staged)]
        finish_attempt(spec, outputs, 0.0)
    except (MissingOutput, StageError, OSError):
        return False
    return True


def finish_attempt(spec: dict[str, Any], outputs: list[dict[str, Any]], seconds: float, durable: bool = True,
                   fenced: bool = True) -> None:
    """Post-job: write the manifest, publish the outputs, commit; then drop the staging directory.

    Raises StageError when storage fails (full, read-only, gone: ``infrastructure``, not the
    payload's fault), FencedOff (after removing what this attempt staged) when a later attempt of
    the job was started: a superseded attempt never publishes over its replacement. ``fenced=False``
    is for the engine's own post-job (it publishes only the attempt it holds current, and a dead
    engine publishes nothing): no fence file to open and lock for every job."""
    result_path = spec.get("result_path")
    if result_path:
        attempt = spec.get("attempt")
        try:
            with _publication(result_path, attempt) if fenced else contextlib.nullcontext():
                manifest = {"outputs": outputs, "seconds": seconds, "attempt": attempt}
                _write_json(f"{result_path}.pending", manifest, durable, direct=True)
                _publish(result_path, manifest)
        except FencedOff:
            _drop(o["staged"] for o in outputs if o.get("node_id") != FINAL_NODE)
            raise
        except OSError as exc:
            raise StageError(f"stage-out: cannot write the result manifest {result_path}.pending: {exc}") from None
        with contextlib.suppress(OSError):
            os.unlink(f"{result_path}.exit")
    _clean_staging(spec)


def stage_in_check(spec: dict[str, Any]) -> None:
    produced = {r["path"] for q in spec["quanta"] for r in q["outputs"]}
    for q in spec["quanta"]:
        for r in q["inputs"]:
            if r["path"] not in produced and not os.path.exists(r["path"]):
                raise StageError(f"stage-in: input {r['dataset_type']} {r['data_id']} missing: {r['path']}")


def _write_json(path: str | Path, data: Any, durable: bool = True, direct: bool = False) -> None:
    """Write JSON atomically (temporary name + rename), or ``direct`` when ``path`` is itself a
    temporary name that only a later rename makes visible (the pending manifest)."""
    tmp = str(path) if direct else f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data))  # one write; json.dump writes every token separately
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    if not direct:
        os.replace(tmp, path)


class FencedOff(StageError):
    """A later attempt of the job was started: this one must not publish (it may be a zombie that
    outlived an orchestrator's recovery, its replacement already running or done)."""


def fence_path(result_path: str | Path, attempt: Any) -> str:
    """The job's fence: ``<logs>/<label>/<name>.fence`` next to its attempts' files. It lists the
    attempts started (one line each, appended), and its lock orders publications of the job."""
    result_path = str(result_path)
    suffix = f".{attempt}.result.json"
    base = result_path[: -len(suffix)] if result_path.endswith(suffix) else result_path.removesuffix(".result.json")
    return f"{base}.fence"


def write_fence(result_path: str | Path, attempt: Any) -> None:
    """Before an attempt starts: make it the job's current one, so no earlier attempt still running
    can publish any more (whoever starts attempts calls this; a first attempt has nothing to fence).
    One appended line: a reader never sees half a number (it ignores an unfinished last line)."""
    if not isinstance(attempt, int) or attempt <= 1:
        return
    fd = os.open(fence_path(result_path, attempt), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{attempt}\n".encode())
    finally:
        os.close(fd)


def _latest_started(fd: int) -> int:
    data = b""
    while chunk := os.pread(fd, 1 << 16, len(data)):
        data += chunk
    return max((int(x) for x in data.split(b"\n")[:-1] if x.strip().isdigit()), default=0)


@contextlib.contextmanager
def _publication(result_path: str | Path, attempt: Any) -> Any:
    """Hold the job's publication lock (a POSIX lock on its fence: it holds across hosts on NFS);
    raise FencedOff if a later attempt than ``attempt`` was started. Check and publication are one
    step for every other attempt of the job: a newer attempt's publication waits for an older one
    that got in first, so the newer always publishes last."""
    import fcntl

    path = fence_path(result_path, attempt)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StageError(f"stage-out: cannot open the job's fence {path}: {exc}") from None
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: the check still happens
            fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            mine = int(attempt)
        except (TypeError, ValueError):
            mine = None
        latest = _latest_started(fd) if mine is not None else 0
        if mine is not None and latest > mine:
            raise FencedOff(f"fenced off: attempt {mine} was superseded by attempt {latest} of the same job; "
                            f"its outputs are not published ({path})")
        yield
    finally:
        os.close(fd)  # drops the lock


def _drop(paths: Any) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def commit_outputs(result_path: str | Path) -> dict[str, Any]:
    """Publish the outputs listed in ``<result>.pending`` and commit the manifest; idempotent, so
    restart can roll a half-done publication forward. Raises StageError if an output cannot move,
    FencedOff (dropping the manifest and what it staged) if a later attempt of the job was started."""
    pending = f"{result_path}.pending"
    with open(pending) as fh:
        manifest = json.load(fh)
    try:
        with _publication(result_path, manifest.get("attempt")):
            return _publish(result_path, manifest)
    except FencedOff:
        _drop([*(o["staged"] for o in manifest["outputs"] if o.get("node_id") != FINAL_NODE), pending])
        raise


def _publish(result_path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Rename the staged outputs of ``<result>.pending`` (``manifest``) into place, then commit the
    manifest (under the job's publication lock)."""
    pending = f"{result_path}.pending"
    for o in manifest["outputs"]:
        staged, final = o["staged"], o["path"]
        try:
            os.replace(staged, final)
        except FileNotFoundError:
            if os.path.exists(staged):  # first output of its type: make the directory once
                try:
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.replace(staged, final)
                except OSError as exc:
                    raise StageError(f"stage-out: cannot publish {final}: {exc}") from None
            elif not os.path.isfile(final):
                raise StageError(f"stage-out: {o['dataset_type']} {o['data_id']} is neither staged nor published") from None
        except OSError as exc:
            raise StageError(f"stage-out: cannot publish {final}: {exc}") from None
    try:
        os.replace(pending, result_path)
    except OSError as exc:
        raise StageError(f"stage-out: cannot commit the result manifest {result_path}: {exc}") from None
    return manifest


def _clean_staging(spec: dict[str, Any]) -> None:
    """After a committed attempt: remove what earlier (killed or failed) attempts of the job staged."""
    attempt = spec.get("attempt", 1)
    if not isinstance(attempt, int) or attempt <= 1:
        return
    for q in spec["quanta"]:
        for r in q["outputs"]:
            for a in range(1, attempt):
                with contextlib.suppress(OSError):
                    os.unlink(_staged(spec, r, a))


class MemoryGuard:
    """On batch systems without memory enforcement the wrapper guards itself: it samples the RSS of
    its whole process tree and, over the request, kills the payload and exits as ``oom``."""

    def __init__(self, limit_mb: int, interval: float = 0.1) -> None:
        import threading

        self.limit_mb = limit_mb
        self.interval = interval
        self.peak_mb = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        from batchprod.execution.process import tree_rss_mb

        me = psutil.Process()
        while True:
            try:
                mb = tree_rss_mb(me)
            except psutil.NoSuchProcess:
                return
            self.peak_mb = max(self.peak_mb, mb)
            if mb > self.limit_mb:
                print(f"error: oom: process tree used {mb:.0f} MB > requestMemory {self.limit_mb} MB",
                      file=sys.stderr, flush=True)
                for p in me.children(recursive=True):
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        continue
                os._exit(EXIT_MEMORY_ERROR)
            time.sleep(self.interval)


def _own_peak_kb() -> int:
    """Peak RSS of this process since it started the wrapper (KiB): the high-water mark of its own
    address space. ``ru_maxrss`` of RUSAGE_SELF is not that: it also holds the peak of the address
    space the process had before ``exec`` — its parent's (a Parsl worker, a batch shell)."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _write_usage(path: str, guard: MemoryGuard | None, spec: dict[str, Any]) -> None:
    """Resource use of the attempt and the provenance context it ran in (host, software, environment),
    for backends whose jobs run elsewhere than the orchestrator."""
    import resource
    import socket

    from batchprod.provenance.capture import context_hash, context_record, payload_modules

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # the payload's processes were started by this one: their peaks are the job's own
    peak = max(_own_peak_kb(), kids.ru_maxrss) / 1024
    if guard is not None:
        peak = max(peak, guard.peak_mb)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    final = spec.get("final") or {}
    record = context_record(payload_modules([*spec["quanta"], final]))
    with contextlib.suppress(OSError):
        _write_json(path, {"peak_rss_mb": peak, "cpu_s": cpu, "host": socket.gethostname(),
                           "context": context_hash(record), "context_record": record})


def spec_from_run(submit_dir: str, job_index: int | None, attempt: str) -> dict[str, Any]:
    """Build a job's spec from the run's workflow file (batch systems that start the wrapper with a
    job index instead of a spec: one submit file per group, not one file per job)."""
    from batchprod.execution.run import Run
    from batchprod.workflow.generic import FinalJob

    run = Run(submit_dir)
    wf = run.workflow
    if job_index is None:
        spec = wf.final_spec()
        if spec is None:
            raise SystemExit(f"{submit_dir}: this run has no final job")
        label = name = FinalJob.NAME
    else:
        spec = wf.job_spec(job_index)
        label, name = wf.group(job_index).name, spec["name"]
    spec.update(attempt=attempt, result_path=str(run.attempt_paths(label, name, attempt)[2]))
    run.attempt_paths(label, name, attempt)[2].parent.mkdir(parents=True, exist_ok=True)
    return spec


def _read_spec(argv: list[str]) -> dict[str, Any]:
    import argparse

    if not argv:
        return json.loads(sys.stdin.read())
    ap = argparse.ArgumentParser(prog="python -m batchprod.execution.runner")
    ap.add_argument("--submit-dir", required=True)
    ap.add_argument("--job-index", type=int)
    ap.add_argument("--final", action="store_true")
    ap.add_argument("--attempt", default="1")
    a = ap.parse_args(argv)
    if a.final == (a.job_index is not None):
        ap.error("give exactly one of --job-index or --final")
    return spec_from_run(a.submit_dir, a.job_index, a.attempt)


def main() -> int:
    spec = _read_spec(sys.argv[1:])
    if spec.get("new_session"):
        # under an executor that shares its process group (Parsl workers): a group of our own, so a
        # kill reaches the payload's whole tree and nothing else
        with contextlib.suppress(OSError):
            os.setsid()
    if spec.get("pid_path"):
        with contextlib.suppress(OSError):
            Path(spec["pid_path"]).write_text(str(os.getpid()))
    guard = MemoryGuard(int(spec["memory_mb"])) if spec.get("enforce_memory") and spec.get("memory_mb") else None
    usage = spec.get("usage_path")
    try:
        return _main(spec)
    finally:
        if usage:
            _write_usage(usage, guard, spec)


def _main(spec: dict[str, Any]) -> int:
    t0 = time.time()
    staged = staging_map(spec)
    outputs: list[dict[str, Any]] = []
    try:
        stage_in_check(spec)
        if spec.get("final"):
            final = spec["final"]
            if final.get("python"):
                load_function(final["python"])(spec)
            else:
                _run_command(final["command"], "finalJob")
            outputs.extend(final_outputs(final))
        for q in spec["quanta"]:
            print(f"quantum {q['label']} {q['data_id']}", flush=True)
            outputs.extend(run_quantum(q, staged))
        finish_attempt(spec, outputs, time.time() - t0)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    except MemoryError:
        traceback.print_exc()
        return EXIT_MEMORY_ERROR
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
