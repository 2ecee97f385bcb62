"""Command templates: placeholders filled with shell-quoted values, and a job of commands as one bash script.

Every substituted value is one shell word (quoted); ``${NAME}`` is left for the job's own shell, so
no secret from the submitting environment is baked into the submit directory.
"""

from __future__ import annotations

import functools
import re
import shlex
import signal
import string
from types import SimpleNamespace
from typing import Any

from batchprod.execution.protocol import EXIT_INFRASTRUCTURE, KILL_SIGNALS, staged_quantum


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


def quantum_what(q: dict[str, Any]) -> str:
    """How batchprod's own log lines name a quantum: ``calibrate visit=1 detector=0``."""
    return " ".join([q["label"], *(f"{k}={v}" for k, v in q["data_id"].items())])


#: batchprod's own error line names the command on that one line (a multi-line command's later lines
#: would read as the payload's), and not all of a long one
MAX_CMD_SHOWN = 300


def one_line(cmd: str) -> str:
    """A command as batchprod's own error line shows it (the shell trap does the same in bash)."""
    flat = "; ".join(ln.strip() for ln in cmd.splitlines() if ln.strip())
    return flat if len(flat) <= MAX_CMD_SHOWN else flat[:MAX_CMD_SHOWN] + "..."


def _exit_trap() -> str:
    """The job script's EXIT trap: says which command failed, and makes a payload killed by a kill
    signal (the shell reports 128+N) kill the job's shell with it, so the backend sees a kill."""
    names = " ".join(f"{128 + int(s)}) _bp_sig={signal.Signals(s).name.removeprefix('SIG')};;"
                     for s in sorted(KILL_SIGNALS))
    resets = " ".join(signal.Signals(s).name.removeprefix("SIG") for s in sorted(KILL_SIGNALS) if s != signal.SIGKILL)
    # the command on one line (as one_line() does): newlines become "; ", cut at MAX_CMD_SHOWN
    flat = ('printf -v _bp_nl "\\n"; _bp_c=${_bp_cmd//$_bp_nl/; }; '
            f'[ ${{#_bp_c}} -gt {MAX_CMD_SHOWN} ] && _bp_c="${{_bp_c:0:{MAX_CMD_SHOWN}}}..."; ')
    return ("trap '_bp_rc=$?; set +eu; trap - EXIT; if [ $_bp_rc -ne 0 ]; then _bp_sig=; "
            f"case $_bp_rc in {names} esac; {flat}"
            'if [ -n "$_bp_sig" ]; then echo "error: $_bp_what: payload killed by SIG$_bp_sig: $_bp_c" >&2; '
            f"trap - {resets}; kill -s $_bp_sig $$; kill -s KILL $$; fi; "
            'echo "error: $_bp_what: command exited with code $_bp_rc: $_bp_c" >&2; fi; exit $_bp_rc\' EXIT')


BASH = "/bin/bash"

#: a job script runs each command through eval (a stray quote or here-document in one cannot swallow
#: the rest of the script) and stops at the first that fails
_EVAL = 'eval "$_bp_cmd"\n_bp_rc=$?; if [ $_bp_rc -ne 0 ]; then exit $_bp_rc; fi'


def _completion_marker(spec: dict[str, Any], lines: list[str]) -> None:
    """The commands finished well: a marker lets a restart finish post-job if the orchestrator died."""
    if spec.get("result_path"):
        marker = shlex.quote(spec["result_path"] + ".exit")
        lines.append(f"_bp_what=post-job; _bp_cmd='write the completion marker'; printf 0 > {marker} "
                     f"|| exit {EXIT_INFRASTRUCTURE}")


def _rubin_script(spec: dict[str, Any]) -> str:
    """A Rubin job (Butler protocol): its one command, already rendered from the config's
    ``runQuantumCommand`` with its quanta's node ids; ``run-qbb`` also writes the attempt's summary
    (per-quantum status), from which the protocol tells success and names a failed quantum."""
    from batchprod.execution.butler import summary_path

    cmd = spec["command"]
    if spec["quanta"] and spec.get("result_path") and " run-qbb " in f" {cmd} ":
        cmd = f"{cmd} --summary {shlex.quote(summary_path(spec['result_path']))}"
    lines = ["_bp_what=job; _bp_cmd=", _exit_trap()]
    ids = ",".join(q["node_id"] for q in spec["quanta"][:3]) + ("..." if len(spec["quanta"]) > 3 else "")
    lines.append(f"{STRICT}; _bp_what={shlex.quote(spec['name'])}; _bp_cmd={shlex.quote(cmd)}")
    n = len(spec["quanta"])
    said = f"job {spec['name']}: {n} quant{'um' if n == 1 else 'a'} {ids}" if n else f"job {spec['name']}"
    lines.append(f"echo {shlex.quote(said)}")
    lines.append(_EVAL)
    _completion_marker(spec, lines)
    return "\n".join(lines) + "\n"


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
    if spec.get("protocol") == "butler" and not spec.get("final"):
        return _rubin_script(spec)
    if spec.get("final") or any(q.get("python") or not q.get("command") for q in spec["quanta"]):
        return None
    lines = ["_bp_what=job; _bp_cmd=", _exit_trap()]
    for q in spec["quanta"]:
        what = quantum_what(q)
        cmd = render_command(q["command"], staged_quantum(q, staged))
        # the options again for every command: one may have changed them for the next
        lines.append(f"{STRICT}; _bp_what={shlex.quote(what)}; _bp_cmd={shlex.quote(cmd)}")
        lines.append(f"echo {shlex.quote('quantum ' + what)}")
        # (a command that turned 'set -e' off still fails the job by its own exit status)
        lines.append(_EVAL)
    _completion_marker(spec, lines)
    # every backend starts it with bash itself (local and Parsl: bash -c, Slurm: #!/bin/bash): no
    # re-exec guard, which made bash parse the script twice per job (~1 ms CPU a job)
    return "\n".join(lines) + "\n"
