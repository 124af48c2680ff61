"""Every `distpose` subcommand, found by walking the argument parser, runs without -q or -v, and takes either
anywhere on the line."""

import argparse

import pytest

from distpose.commands import build_parser, main, parse_arguments


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Every runnable subcommand of `parser`, by its words: ('data', 'synth') for `distpose data synth`."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return {path: parser}
    found = {}
    for action in subparsers:
        for name, sub in action.choices.items():
            found.update(leaves(sub, (*path, name)))
    return found


# The rest of each command line after its words (T is the test's scratch directory), and the exit code it must
# end with. Each leaf gets only what gets it past argument handling: a real run where that takes a second, else a
# missing or unusable path that the command must name in one line.
ARGUMENTS = {
    ("data", "synth"): (["--out", "T/synth", "--train", "2", "--val", "1"], 0),
    ("data", "shard"): (["--coco-root", "T/synth", "--split", "train", "--out", "T/shards"], 0),
    ("data", "verify"): (["T/shards"], 0),
    ("train",): (["T/missing.yaml"], 2),
    ("tune",): (["T/missing.yaml"], 2),
    ("eval",): (["--checkpoint", "T/missing.pt"], 2),
    ("predict",): (["--checkpoint", "T/missing.pt", "T/synth/val", "--out", "T/predictions"], 2),
    ("pipeline",): (["T/missing"], 2),
    ("config",): (["quick/cnn"], 0),
    ("model-info",): (["cnn_small", "--input", "64x48"], 0),
    ("convert",): (["T/missing.pth", "T/converted.pt", "--arch", "resnet50"], 2),
    ("bench", "loader"): (["--out", "T"], 2),
    ("bench", "train"): (["data.shards=T/missing"], 2),
    ("bench", "crf"): (["--out", "T"], 2),
    ("bench", "kernel"): (["--out", "T"], 2),
    ("bench", "ablation"): (["T/missing"], 2),
    ("bench", "scale"): (["--quick", "--work", "T/synth/annotations/person_keypoints_train.json"], 2),
}


def test_every_leaf_has_arguments_here():
    assert set(leaves(build_parser())) == set(ARGUMENTS)


def test_every_command_and_group_answers_help(capsys):
    """`distpose bench --help` once died in argparse: a help string with a bare "95%" is a format string."""
    words = {w[:depth] for w in ARGUMENTS for depth in range(len(w) + 1)}
    for prefix in sorted(words):
        with pytest.raises(SystemExit) as exit_info:
            main([*prefix, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.startswith("usage: distpose"), f"distpose {' '.join(prefix)} --help"
        assert "%%" not in out, f"distpose {' '.join(prefix)} --help prints a doubled %: {out}"


def _argv(words: tuple[str, ...], scratch) -> list[str]:
    rest, _ = ARGUMENTS[words]
    return [*words, *(str(scratch) if a == "T" else a.replace("T/", f"{scratch}/") for a in rest)]


def test_every_leaf_runs_without_quiet_or_verbose(tmp_path, capsys):
    """The README's data commands once died of `'Namespace' object has no attribute 'quiet'` unless given -q."""
    for words in ARGUMENTS:  # in order: shard reads what synth wrote, verify what shard wrote
        code = main(_argv(words, tmp_path))
        err = capsys.readouterr().err
        expected = ARGUMENTS[words][1]
        assert code == expected, f"distpose {' '.join(words)} exited {code}, expected {expected}: {err[-2000:]}"
        assert "Traceback" not in err, f"distpose {' '.join(words)}: {err[-2000:]}"
        if code:
            errors = [line for line in err.splitlines() if line.startswith("distpose: error:")]
            assert len(errors) == 1 and str(tmp_path) in errors[0], f"distpose {' '.join(words)}: {err[-2000:]}"


@pytest.mark.parametrize("words", list(ARGUMENTS), ids=" ".join)
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("flag", ["-q", "-v"])
def test_every_leaf_takes_quiet_and_verbose_anywhere(words, where, flag, tmp_path):
    argv = _argv(words, tmp_path)
    args = build_parser().parse_args([flag, *argv] if where == "first" else [*argv, flag])
    assert getattr(args, "quiet" if flag == "-q" else "verbose") is True


def test_overrides_go_anywhere_on_the_line_and_other_strays_are_refused(capsys):
    args = parse_arguments(["pipeline", "quick", "a.b=1", "--val-images", "50", "train.epochs=1", "c.d=2"])
    assert args.config == "quick" and args.overrides == ["a.b=1", "train.epochs=1", "c.d=2"] and args.val_images == 50
    assert parse_arguments(["train", "--address", "x:1", "train.epochs=1"]).overrides == ["train.epochs=1"]
    assert parse_arguments(["train", "train.epochs=1"]).config is None  # an override, not a config path
    for argv in (["train", "quick/cnn", "--address", "x:1", "stray"], ["eval", "--checkpoint", "m.pt", "a.b=1"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_arguments(argv)
        assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_a_quiet_call_leaves_the_next_call_its_progress(tmp_path, capsys):
    """main() in one process twice (a notebook, a test session): -q on the first must not silence the second."""
    args = ["data", "synth", "--out", str(tmp_path), "--train", "1", "--val", "1"]
    assert main([*args, "-q"]) == 0
    capsys.readouterr()
    assert main(args) == 0  # the same set again
    assert "nothing to do" in capsys.readouterr().err
