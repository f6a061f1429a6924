"""`fedmeta partition` and `fedmeta sweep`: every argument checked before anything runs or is written."""

import json

import pytest

from fedmeta.cli import build_parser, main

SMALL = ["--set", "data.num_clients=6", "--set", "data.examples_per_client=10"]


def run(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse errors exit from inside parse_args
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *needles: str) -> bool:
    lines = err.splitlines()
    return len(lines) == 1 and lines[0].startswith("fedmeta: ") and all(n in lines[0] for n in needles)


def test_partition_ignores_sections_it_does_not_use(tmp_path, capsys):
    # simulation.clients_per_round (default 10) exceeds the 4 training clients of 6: irrelevant to partition
    code, out, err = run(capsys, "partition", *SMALL, "--set", "simulation.rounds=0", "--out", str(tmp_path / "p"))
    assert code == 0, err
    index = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert len(index["clients"]) == 6 and "wrote 6 client directories" in out


def test_partition_still_validates_data_and_model(tmp_path, capsys):
    for bad, field in (("data.seed=-1", "data.seed: must be >= 0"), ("model.embed_dim=0", "model.embed_dim"), ("dat.x=1", "dat: unknown key")):
        code, _, err = run(capsys, "partition", "--set", bad, "--out", str(tmp_path / "p"))
        assert code == 2 and one_line(err, field), err
        assert not (tmp_path / "p").exists()


def test_partition_refuses_a_non_empty_target_and_overwrite_clears_it(tmp_path, capsys):
    out = tmp_path / "p"
    assert run(capsys, "partition", "--set", "data.num_clients=12", "--set", "data.examples_per_client=10", "--out", str(out))[0] == 0
    assert len(list(out.glob("client_*"))) == 12
    code, _, err = run(capsys, "partition", *SMALL, "--out", str(out))
    assert code == 2 and one_line(err, str(out), "not empty", "--overwrite"), err
    assert len(list(out.glob("client_*"))) == 12  # untouched
    code, _, err = run(capsys, "partition", *SMALL, "--out", str(out), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["client_00000", "client_00001", "client_00002", "client_00003",
                                                    "client_00004", "client_00005", "dataset.json"]  # no stale clients


def test_overwrite_touches_only_a_previous_partition(tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "client_00000").mkdir()
    code, _, err = run(capsys, "partition", *SMALL, "--out", str(out), "--overwrite")
    assert code == 2 and one_line(err, "notes.txt"), err
    assert (out / "notes.txt").read_text() == "keep me" and (out / "client_00000").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run(capsys, "partition", *SMALL, "--out", str(f))
    assert code == 2 and one_line(err, "not a directory"), err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--noise", "-1"], "sweep --noise: each noise multiplier must be in (0, 1e6] (got -1.0)"),
        (["--noise", "0"], "sweep --noise: each noise multiplier must be in (0, 1e6] (got 0.0)"),
        (["--noise", "1", "nan"], "sweep --noise"),
        (["--noise", "1", "1"], "sweep --noise: each value at most once"),
        (["--noise", "1", "1.0000001"], "two settings would both be named 'z1-C1'"),
        (["--clip", "0"], "sweep --clip: each clip norm must be in (0, 1e6] (got 0.0)"),
        (["--clip", "inf"], "sweep --clip"),
        (["--seeds", "0", "-1"], "sweep --seeds: each seed must be in [0, 4294967295] (got -1)"),
        (["--seeds", "99999999999999999999"], "sweep --seeds"),
        (["--set", "privacy.delta=2"], "privacy.delta: must be < 1"),
        (["--noise", "x"], "argument --noise: invalid float value: 'x'"),
    ],
)
def test_sweep_validates_every_argument_before_running_anything(tmp_path, capsys, args, needle):
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "sweep", *SMALL, "--set", "simulation.engine=sequential", "--set", "simulation.clients_per_round=2", *args, "--out", str(out))
    assert code == 2 and one_line(err, needle), err
    assert stdout == "" and not out.exists()  # the non-private baseline did not run


@pytest.mark.parametrize("command", ["partition", "sweep"])
def test_every_option_has_help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert options and all(a.help for a in options), [a.dest for a in options if not a.help]
    text = sub.format_help()
    assert all(a.help.split("(")[0].strip()[:20] in " ".join(text.split()) for a in options)


@pytest.mark.parametrize("fmt, dataset", [("dirs", "disk"), ("store", "store"), ("dirs", "store"), ("store", "disk")])
@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_partition_never_writes_over_its_own_source(tmp_path, capsys, fmt, dataset, where):
    src = tmp_path / "outer" / "src"
    made = run(capsys, "partition", *SMALL, "--format", "dirs" if dataset == "disk" else "store", "--out", str(src))
    assert made[0] == 0, made[2]
    before = {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = {"same": src, "inside": src / "sub", "around": tmp_path / "outer"}[where]
    code, _, err = run(capsys, "partition", *SMALL, "--format", fmt, "--set", f"data.dataset={dataset}",
                       "--set", f"data.path={src}", "--out", str(out), "--overwrite")
    assert code == 2 and one_line(err, "data.path", "the dataset being read"), err
    assert {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # source intact
    assert not (src / "sub").exists()
