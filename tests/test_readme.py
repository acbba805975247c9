"""README's ```bash and ```python blocks run in order, as on a fresh clone, so README cannot drift.

Every command line of those blocks is classified; a line of a kind not listed here fails
`test_every_readme_command_is_classified` until it is classified below:

- setup (`make`, `apt-get`, `pip install`; SETUP): skipped. They build the environment this test
  already runs in (`make test` is what CI itself runs; `make demo` trains for half a minute).
- `distillkit ...`: run through the venv's entry point in a temporary directory holding a copy of
  configs/ (what a fresh clone has), with SHRINK's arguments appended for the subcommands that
  train (`epochs=1`; later overrides win), so README keeps realistic epochs.
- `distillkit serve-teacher ...`: a server, so it is started in the background on a free port (an
  appended `--port`), must answer GET /healthz, and must exit 0 on SIGTERM.
- `torchrun ... -m distillkit ...`: run for real, with README's process count and `epochs=1`. On the
  2-core machine two gloo processes on digits take about 15 s, well under the 60 s above which a
  `--help` check would be the better trade, and only a real run catches a collision with the run
  directories of the lines before it.
- `python -c ...`: run with the venv's python.
- `python benchmarks/X.py ...`: checked, not run (a benchmark takes hours): the script must exit 0
  on `--help`, and its own argument parser must accept README's arguments (the script is run with
  them and stopped as soon as its parser returns). Where the prose of README's section states the
  learning rate or batch size, the command must run with that value.
- `python -m pytest PATH...`: every named path must exist (the suite cannot run itself).
- `bash benchmarks/NAME.sh`: scripts for another machine (a GPU): the file must exist and parse.
- ```python blocks: run with the venv's python; "epochs=N" strings in them shrink to "epochs=1".

Measured on the 2-core development machine: about 70 s of CPU time for the whole README, run one
command at a time (most of it process start-up: each command imports torch).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
# programs whose lines set up the environment; skipped (this test runs inside that environment)
SETUP = {"make", "apt-get", "apt", "pip", "pip3"}
# appended to the lines of subcommands that train, to keep the test short
SHRINK = {
    "train": ["epochs=1"],
    "distill": ["epochs=1"],
    "da-score": ["epochs=1"],
    "demo": ["--epochs", "1"],
}
RUN_FENCES = {"bash", "python"}
# fences that look like commands but would be ignored: write them as ```bash or ```python
WRONG_FENCES = {"sh", "shell", "zsh", "console", "py", "python3", "pycon"}
SHELL_OPERATORS = {"|", "||", ";", "&", ">", ">>", "<", "(", ")"}
CMD_TIMEOUT = 180


@dataclass
class Command:
    """One README command: its kind, arguments (program name normalised), environment, source."""

    # setup | distillkit | server | torchrun | python-c | benchmark | pytest | python-block
    # | shell-script
    kind: str
    argv: list[str]
    text: str
    line: int
    env: dict[str, str] = field(default_factory=dict)


# -- parsing README -------------------------------------------------------------------------------
def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the opening fence) of every fenced block, in order."""
    blocks, lang, body, start = [], None, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, body, start = line[3:].strip(), [], i
            else:
                blocks.append((lang, "\n".join(body), start))
                lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise ValueError(f"README line {start}: fence never closed")
    return blocks


def _tokens(line: str) -> list[str]:
    """Shell words of one logical line, operators as their own words, comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def classify(tokens: list[str], text: str, line: int) -> Command:
    """The Command for one simple command's words (leading VAR=value words become its env)."""
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if not tokens:
        return Command("unknown", tokens, text, line, env)
    prog, args = Path(tokens[0]).name, tokens[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", prog) and args[:2] == ["-m", "distillkit"]:
        prog, args = "distillkit", args[2:]  # the same program as the entry point
    kind = "unknown"
    if prog in SETUP:
        kind = "setup"
    elif prog == "distillkit":
        kind = "server" if args[:1] == ["serve-teacher"] else "distillkit"
    elif prog == "torchrun" and "-m" in args and args[args.index("-m") + 1 :][:1] == ["distillkit"]:
        kind = "torchrun"
    elif prog == "bash" and args[:1] and re.fullmatch(r"benchmarks/[\w.-]+\.sh", args[0]):
        kind = "shell-script"
    elif re.fullmatch(r"python(3(\.\d+)?)?", prog) and args:
        if args[0] == "-c":
            kind = "python-c"
        elif args[:2] == ["-m", "pip"]:
            kind = "setup"
        elif args[:2] == ["-m", "pytest"]:
            kind = "pytest"
        elif args[0].startswith("benchmarks/") and args[0].endswith(".py"):
            kind = "benchmark"
    return Command(kind, [prog, *args], text, line, env)


def readme_commands(text: str) -> list[Command]:
    """Every command of README's ```bash and ```python blocks, in README order."""
    commands = []
    for lang, body, start in fenced_blocks(text):
        if lang in WRONG_FENCES:
            commands.append(Command(f"fence ```{lang}", [], body, start))
        if lang == "python":
            commands.append(Command("python-block", ["python"], body, start))
        if lang != "bash":
            continue
        logical, first = "", 0
        for offset, raw in enumerate(body.splitlines(), 1):
            if not logical:
                first = start + offset
            if raw.rstrip().endswith("\\"):
                logical += raw.rstrip()[:-1] + " "
                continue
            logical += raw
            words = _tokens(logical)
            text_line, logical = " ".join(words), ""
            parts: list[list[str]] = [[]]
            for w in words:
                if w == "&&":
                    parts.append([])
                elif w in SHELL_OPERATORS:
                    parts = [[f"shell operator {w!r}"]]
                    break
                else:
                    parts[-1].append(w)
            for part in parts:
                if part:
                    commands.append(classify(part, text_line, first))
    return commands


def sections(text: str) -> list[tuple[str, str, list[Command]]]:
    """(heading, prose outside fences, commands) for every README section."""
    out = []
    for chunk in re.split(r"(?m)^(?=#{2,4} )", text):
        heading = chunk.splitlines()[0] if chunk.strip() else ""
        prose = re.sub(r"(?ms)^```.*?^```", "", chunk)
        out.append((heading, prose, readme_commands(chunk)))
    return out


# -- running ----------------------------------------------------------------------------------------
def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _entry() -> list[str]:
    """The venv's `distillkit` entry point (python -m distillkit where there is none)."""
    script = BIN / "distillkit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "distillkit"]


def _check(proc: subprocess.CompletedProcess, cmd: Command) -> None:
    if proc.returncode != 0:
        out = proc.stderr or proc.stdout or ""
        # the first error of a child (torchrun) comes before the launcher's summary at the end
        shown = out if len(out) <= 4000 else f"{out[:2000]}\n...\n{out[-2000:]}"
        pytest.fail(f"README line {cmd.line} exited {proc.returncode}: {cmd.text}\n{shown}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(cmd: Command, cwd: Path) -> None:
    """Start a serve-teacher line on a free port, wait for /healthz, stop it with SIGTERM."""
    port = _free_port()
    log = cwd / f"server_{cmd.line}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*_entry(), *cmd.argv[1:], "--port", str(port), "--host", "127.0.0.1"],
            cwd=cwd,
            env=_env(cmd.env),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"README line {cmd.line} exited {proc.returncode}: {cmd.text}\n"
                            f"{log.read_text()[-3000:]}")  # fmt: skip
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"README line {cmd.line}: no /healthz answer in 90 s: {cmd.text}")
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        assert rc == 0, f"README line {cmd.line} exited {rc} on SIGTERM\n{log.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_command(cmd: Command, cwd: Path) -> None:
    """Run (or check) one README command in cwd, as the module docstring describes."""
    env, timeout = _env(cmd.env), CMD_TIMEOUT
    if cmd.kind == "distillkit":
        argv = [*_entry(), *cmd.argv[1:], *SHRINK.get(cmd.argv[1] if len(cmd.argv) > 1 else "", [])]
    elif cmd.kind == "torchrun":
        sub = cmd.argv[cmd.argv.index("-m") + 2]
        argv = [str(BIN / "torchrun"), *cmd.argv[1:], *SHRINK.get(sub, [])]
        if not (BIN / "torchrun").is_file():
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    elif cmd.kind == "python-c":
        argv = [sys.executable, *cmd.argv[1:]]
    elif cmd.kind == "shell-script":
        # a device script (GPU checks) cannot run here: it must exist and parse
        argv = ["bash", "-n", str(ROOT / cmd.argv[1])]
    elif cmd.kind == "python-block":
        code = re.sub(r"""(["'])epochs=\d+\1""", r"\1epochs=1\1", cmd.text)
        argv = [sys.executable, "-c", code]
    elif cmd.kind == "server":
        run_server(cmd, cwd)
        return
    elif cmd.kind == "pytest":
        paths = [a for a in cmd.argv[3:] if not a.startswith("-")]
        missing = [p for p in paths if not (ROOT / p.split("::")[0]).exists()]
        assert paths and not missing, f"README line {cmd.line}: missing {missing}: {cmd.text}"
        return
    else:
        return  # setup lines; benchmarks are checked in test_readme_benchmark_arguments
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    _check(proc, cmd)


# the helper run in a child process: each benchmark script runs until its argument parser returns
ARGCHECK = r"""
import argparse, contextlib, io, json, runpy, sys

class Parsed(Exception):
    pass

real = argparse.ArgumentParser.parse_known_args

def stop(self, args=None, namespace=None):
    ns, extra = real(self, args, namespace)
    raise Parsed(ns, extra)

argparse.ArgumentParser.parse_known_args = stop
results = []
for script, argv in json.loads(sys.argv[1]):
    res = {}
    for key, words in (("help", ["--help"]), ("args", argv)):
        sys.argv = [script, *words]
        so, se = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
                runpy.run_path(script, run_name="__main__")
            res[key] = {"status": "finished without parsing its arguments"}
        except Parsed as p:
            ns, extra = p.args
            status = "parsed" if not extra else f"unrecognized arguments: {extra}"
            res[key] = {"status": status, "namespace": vars(ns)}
        except SystemExit as e:
            res[key] = {"status": f"exit {e.code}", "stdout": so.getvalue(), "stderr": se.getvalue()}
    results.append(res)
print(json.dumps(results, default=str))
"""


def check_benchmarks(commands: list[Command], cwd: Path) -> list[dict]:
    """For each benchmark command: its --help outcome and its parsed arguments (one child process)."""
    missing = [c.argv[1] for c in commands if not (ROOT / c.argv[1]).is_file()]
    assert not missing, f"README names benchmark scripts that do not exist: {missing}"
    jobs = [[str(ROOT / c.argv[1]), c.argv[2:]] for c in commands]
    proc = subprocess.run(
        [sys.executable, "-c", ARGCHECK, json.dumps(jobs)],
        cwd=cwd,
        env=_env({}),
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- tests ------------------------------------------------------------------------------------------
def test_readme_parser_classifies_and_rejects():
    """The parser joins continuations, splits &&, reads env prefixes and flags unknown lines."""
    text = (
        "```bash\n"
        "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/x.py --a 1 \\\n    --b 2  # note\n"
        "apt-get update && apt-get install -y pkg\n"
        "rm -rf runs\n"
        "distillkit train configs/a.yaml | tee log\n"
        "python -m distillkit serve-teacher runs/t --port 8000\n"
        "```\n```sh\nls\n```\n```python\nprint(1)\n```\n"
    )
    cmds = readme_commands(text)
    assert [c.kind for c in cmds] == [
        "benchmark",
        "setup",
        "setup",
        "unknown",
        "unknown",
        "server",
        "fence ```sh",
        "python-block",
    ]
    assert cmds[0].env == {"OMP_NUM_THREADS": "1"}
    assert cmds[0].argv == ["python", "benchmarks/x.py", "--a", "1", "--b", "2"]
    assert cmds[0].line == 2 and cmds[3].line == 5
    assert cmds[4].argv == ["shell operator '|'"]


def test_every_readme_command_is_classified():
    """A new kind of README line fails here until this file knows how to run or check it."""
    cmds = readme_commands(README.read_text())
    unknown = [f"line {c.line}: {c.text}" for c in cmds if c.kind not in KINDS]
    assert not unknown, "classify these README lines in tests/test_readme.py:\n" + "\n".join(
        unknown
    )
    assert any(c.kind == "distillkit" for c in cmds) and any(c.kind == "benchmark" for c in cmds)


KINDS = {
    "setup",
    "distillkit",
    "server",
    "torchrun",
    "python-c",
    "benchmark",
    "pytest",
    "python-block",
    "shell-script",
}


@pytest.fixture(scope="module")
def benchmark_checks(tmp_path_factory):
    """Every README benchmark command with its --help outcome and parsed arguments."""
    cmds = [c for c in readme_commands(README.read_text()) if c.kind == "benchmark"]
    return list(zip(cmds, check_benchmarks(cmds, tmp_path_factory.mktemp("bench"))))


@pytest.mark.slow
def test_readme_benchmark_arguments(benchmark_checks):
    """Each benchmark script shows --help and its parser accepts README's arguments."""
    assert benchmark_checks
    for cmd, res in benchmark_checks:
        where = f"README line {cmd.line}: {cmd.text}"
        assert res["help"]["status"] == "exit 0", f"{where}\n--help: {res['help']}"
        assert "usage:" in res["help"]["stdout"], where
        assert res["args"]["status"] == "parsed", f"{where}\n{res['args']}"


# prose number -> the argument of the section's benchmark command that must equal it
PROSE_ARGS = {"lr": r"\blr\s+(\d+(?:\.\d+)?)\b", "batch_size": r"\bbatch\s+(\d+)\b"}


@pytest.mark.slow
def test_readme_benchmark_prose_matches_command(benchmark_checks):
    """A learning rate or batch size stated in a section's text is the one its command runs."""
    parsed = {c.text: res["args"].get("namespace", {}) for c, res in benchmark_checks}
    checked = 0
    for heading, prose, cmds in sections(README.read_text()):
        for cmd in (c for c in cmds if c.kind == "benchmark"):
            ns = parsed[cmd.text]
            for arg, pattern in PROSE_ARGS.items():
                if ns.get(arg) is None:
                    continue
                for value in re.findall(pattern, prose):
                    checked += 1
                    assert float(value) == float(ns[arg]), (
                        f"{heading}: the text says {arg.split('_')[0]} {value}, "
                        f"the command runs {arg}={ns[arg]}: {cmd.text}"
                    )
    assert checked, "no section states an lr or batch size next to a benchmark command"


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path):
    """Every ```bash and ```python block of README, in order, in a fresh directory."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    cmds = readme_commands(README.read_text())
    assert not [c for c in cmds if c.kind not in KINDS], (
        "see test_every_readme_command_is_classified"
    )
    for cmd in cmds:
        run_command(cmd, tmp_path)
