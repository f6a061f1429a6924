"""Every command that README.md and docs/*.md show is at least parseable as written (issue 19).

Each command line of a ``bash``/``sh`` block (and each ``$ fedmeta ...`` or
``fedmeta <subcommand> ...`` line of a plain block) is checked without running it:

* ``fedmeta ...``: parsed by the real argparse parser (:func:`fedmeta.cli.build_parser`), then its
  ``--config``/``--set`` are validated as the command would (``sweep``: every run's config);
* ``python -m experiments.X ...``: the module's own parser parses the arguments (stopped right after
  ``parse_args``), and its ``--config``/``--set`` are validated;
* ``flwr run ...``: every ``--run-config`` key is one of the app's run-config keys
  (``[tool.flwr.app.config]`` of the project's ``pyproject.toml``, which is what Flower checks) with a
  valid value, and every ``--federation-config`` key a field of flwr's ``SimulationConfig``;
* ``pip install -e ".[X]"``: the extra X exists.

A command with a shell variable (``$m``) is parsed with the variable standing in, and its config not
validated. Paths that exist only on the reader's machine (``runs/k10``) are not needed: nothing runs.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "user_project" / "README.md"]
SHELL = {"bash", "sh", "shell", "console"}
SUBCOMMANDS = ("simulate", "privacy", "partition", "sweep", "bench", "plot")


def _commands(path: Path) -> list[tuple[str, str, str | None]]:
    """``(where, command, refusal)`` for every command line of the file's code blocks (continuations joined);
    ``refusal`` is the ``fedmeta: ...`` line a plain block shows right below a command it presents as refused."""
    out = []
    text = path.read_text()
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        lang, body = block.group(1), block.group(2)
        first_line = text[: block.start()].count("\n") + 2
        lines = body.split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            line = line.strip()
            if lang in SHELL:
                line = line.removeprefix("$ ")
            elif lang == "" and re.match(rf"^(\$ )?fedmeta ({'|'.join(SUBCOMMANDS)})\b", line):
                line = line.removeprefix("$ ")
            else:
                continue
            if line and not line.startswith("#"):
                shown = lines[i].strip() if i < len(lines) else ""
                refusal = shown.removeprefix("fedmeta: ") if lang == "" and shown.startswith("fedmeta: ") else None
                out.append((f"{path.relative_to(ROOT)}:{first_line + start}", line, refusal))
    return out


def _segments(command: str) -> list[list[str]]:
    """The simple commands of a line (split at ``&&``, ``;``, ``|``), env assignments and ``do``/``then`` dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    cleaned = []
    for seg in segments:
        while seg and (re.match(r"^[A-Z_][A-Z0-9_]*=", seg[0]) or seg[0] in ("do", "then", "time")):
            seg = seg[1:]
        if seg:
            cleaned.append(seg)
    return cleaned


CASES = [case for doc in DOCS for case in _commands(doc)]
CHECKED = ("fedmeta", "python", "flwr", "pip")


def _cwd_for(where: str) -> Path:
    return ROOT / "examples" / "user_project" if where.startswith("examples/user_project") else ROOT


def _flat(config: dict) -> dict:
    return {f"{s}.{k}": v for s, values in config.items() for k, v in values.items()}


def _check_config(config: str | None, sets: list[str], cwd: Path, variable: bool) -> None:
    from fedmeta.config import load_config, parse_override

    for item in sets:
        parse_override(item)  # KEY=VALUE, a TOML value
    if variable or not cwd.is_dir():  # a shell variable, or `cd my_project` (the reader's own directory)
        return
    path = None if config is None else str(cwd / config)
    load_config(path, sets)


def check_fedmeta(argv: list[str], cwd: Path, variable: bool) -> None:
    from fedmeta.cli import build_parser

    args = build_parser().parse_args(argv)
    if args.command in ("simulate", "partition", "sweep") and getattr(args, "resume", None):
        from fedmeta.config import build_config

        build_config(None, args.set)  # the keys --set may change on resume, with valid values
        return
    if args.command == "sweep" and not variable:
        from fedmeta.sweep import validate_sweep

        validate_sweep(str(cwd / args.config) if args.config else None, args.set, args.noise, args.clip, args.seeds)
    elif hasattr(args, "set") and hasattr(args, "config"):
        _check_config(args.config, args.set, cwd, variable)


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def check_python_module(module: str, argv: list[str], cwd: Path, variable: bool, monkeypatch) -> None:
    import importlib.util

    source = Path(importlib.util.find_spec(module).origin).read_text()
    if "argparse" not in source:  # a module without options: it imports, and is shown without arguments
        __import__(module)
        assert not argv, f"{module} takes no arguments (got {argv})"
        return
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(Parsed) as parsed:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    ns = parsed.value.namespace
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
    if hasattr(ns, "config") and isinstance(getattr(ns, "set", None), list):
        _check_config(ns.config, ns.set, cwd, variable)


def check_flwr_run(argv: list[str], cwd: Path) -> None:
    from flwr.common.config import parse_config_args
    from flwr.proto.federation_config_pb2 import SimulationConfig

    from fedmeta.config import build_config, config_from_run_config

    app = tomllib.loads((cwd / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields = {f.name for f in SimulationConfig.DESCRIPTOR.fields}
    for i, token in enumerate(argv):
        if token == "--run-config":
            given = parse_config_args([argv[i + 1]])
            unknown = sorted(set(given) - set(app))
            assert not unknown, f"--run-config keys not in {cwd.name}/pyproject.toml [tool.flwr.app.config]: {unknown}"
            config_from_run_config({**_flat(build_config(None).to_dict()), **app, **given})  # valid values
        elif token == "--federation-config":
            given = parse_config_args([argv[i + 1]])
            unknown = sorted(k for k in given if k.replace("-", "_") not in fields)
            assert not unknown, f"--federation-config keys flwr 1.41 does not know: {unknown}"


def check_pip(argv: list[str]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for token in argv:
        m = re.fullmatch(r"\.\[([\w,-]+)\]", token)
        if m:
            missing = [e for e in m.group(1).split(",") if e not in extras]
            assert not missing, f"pip install: pyproject.toml has no extra {missing}"


def test_the_docs_show_commands_of_every_kind():
    kinds = {seg[0] for _, command, _ in CASES for seg in _segments(command)}
    assert {"fedmeta", "python", "flwr", "pip"} <= kinds
    assert sum(1 for _, c, _ in CASES if "fedmeta simulate" in c) >= 15
    assert any(refusal for _, _, refusal in CASES)  # README's example of a refused config


@pytest.mark.parametrize("where,command,refusal", CASES, ids=[w for w, _, _ in CASES])
def test_a_documented_command_parses_as_written(where, command, refusal, monkeypatch):
    if refusal is not None:  # shown as refused: it must be, with the very line shown
        from fedmeta.config import ConfigError

        with pytest.raises(ConfigError) as err:
            check_fedmeta(_segments(command)[0][1:], ROOT, False)
        assert str(err.value) == refusal
        return
    cwd = _cwd_for(where)
    if command.startswith("cd "):
        target = command.split()[1]
        cwd = cwd / target
    variable = "$" in command
    for seg in _segments(command):
        head = seg[0]
        argv = [re.sub(r"\$\{?\w+\}?", "x", a) for a in seg[1:]]
        try:
            if head == "fedmeta":
                check_fedmeta(argv, cwd, variable)
            elif head == "python" and argv[:1] == ["-m"] and argv[1].startswith("experiments."):
                check_python_module(argv[1], argv[2:], cwd, variable, monkeypatch)
            elif head == "flwr" and argv[:1] == ["run"]:
                check_flwr_run(argv, cwd if (cwd / "pyproject.toml").exists() else ROOT)
            elif head == "pip":
                check_pip(argv)
        except SystemExit as err:  # argparse refused it
            pytest.fail(f"{where}: `{' '.join(seg)}` is refused by its parser (exit {err.code})")
