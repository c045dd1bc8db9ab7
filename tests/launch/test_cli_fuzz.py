"""The command line, fuzzed (Hypothesis): every subcommand with combinations of its own flags (values
of the right type, wrong type, out of range, missing), unknown flags, stray words and overrides of
every shape, run in-process through `launch.cli.main` on configs and folders that stop before a run
starts. Each case ends with exit 0 (`--help`, `estimate`), or exit 2 and one line `finetrain: ...` per problem: never a
traceback, never another code. A few cases go through the real command line in a subprocess.

Cases: CLI_CASES, seeded (derandomized); FINETRAIN_FUZZ=long runs many more with fresh seeds."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import REPO, causal_config, fuzz_settings, trainer_env, write_config
from launch.cli import build_parser, main

CLI_CASES = 1500


def subcommand_flags() -> dict[str, list[argparse.Action]]:
    """Each subcommand's optional flags, as its parser declares them."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in p._actions if a.option_strings and "--help" not in a.option_strings]
            for name, p in sub.choices.items()}


FLAGS = subcommand_flags()
WORDS = st.sampled_from(["", "-", "--", "x", "0", "-1", "2", "1e9", "abc", "a=b", "optim.lr=1e-5", "optim.lrr=1",
                         "=", "train.max_steps=-3", "--nproc=2", "\ud800", "run.name=\n", "data.datasets.9.path=x"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Configs and folders that stop before anything runs: no file, bad YAML, an unknown key, and a
    config whose batch does not split over the ranks (planned per --nproc); an empty folder."""
    tmp = tmp_path_factory.mktemp("cli-fuzz")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("run: [\n")
    unknown = causal_config(tmp / "unknown")
    unknown["optim"]["lrr"] = 1
    uneven = causal_config(tmp / "uneven", train={"micro_batch_size": 3, "global_batch_size": 4})
    (tmp / "empty").mkdir()
    return {"missing": str(tmp / "missing.yaml"), "bad_yaml": str(bad_yaml),
            "unknown": str(write_config(unknown, tmp / "unknown.yaml")),
            "uneven": str(write_config(uneven, tmp / "uneven.yaml")), "empty": str(tmp / "empty")}


@st.composite
def command_lines(draw, inputs: dict[str, str]) -> list[str]:
    command = draw(st.sampled_from(sorted(FLAGS)) | st.sampled_from(["", "trian", "--version"]))
    argv = [command] if command else []
    positional = st.sampled_from(sorted(inputs.values())) | WORDS
    argv += draw(st.lists(positional, max_size=2))
    flags = FLAGS.get(command) or []
    for action in draw(st.lists(st.sampled_from(flags), max_size=4)) if flags else []:
        argv.append(draw(st.sampled_from(action.option_strings)))
        if action.nargs != 0:  # a value of the right type, or not, or none
            argv += draw(st.lists(st.integers(-2, 9).map(str) | positional, max_size=2))
    argv += draw(st.lists(WORDS | st.sampled_from(["--frobnicate", "--nproc", "-x"]), max_size=2))
    if draw(st.booleans()):
        argv = draw(st.permutations(argv))
    return argv


def test_any_command_line_is_exit_0_or_one_line_and_exit_2(inputs, capsys):
    @fuzz_settings(CLI_CASES)
    @given(argv=command_lines(inputs))
    def case(argv):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        if code == 0:  # --help, or a command that needs no run (estimate, check) on a config it takes
            assert "Traceback" not in out.err, (argv, out.err[-2000:])
            return
        lines = [line for line in out.err.splitlines() if line.strip()]
        assert code == 2 and len(lines) >= 1, (argv, code, out.err[-2000:])
        assert all(line.startswith("finetrain: ") for line in lines), (argv, lines)
        assert "Traceback" not in out.err

    case()


@pytest.mark.parametrize("argv, expected", [
    (["train", "{missing}"], r"^finetrain: \S+missing\.yaml: no such config file$"),
    (["train", "{unknown}", "--nproc", "2"], r"^finetrain: \S+unknown\.yaml:\d+: unknown key optim\.lrr; did you mean optim\.lr\?$"),
    (["submit", "{bad_yaml}", "--nodes", "0"], r"^finetrain: \S+bad\.yaml:\d: not valid YAML"),
])
def test_representative_mistakes_through_the_real_command_line(inputs, argv, expected):
    """The same, through `python -m launch.cli` in a subprocess: one line on stderr, exit code 2."""
    import re

    argv = [item.format(**inputs) for item in argv]
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          env=trainer_env(), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and re.search(expected, lines[0]), (proc.returncode, proc.stderr)


def test_arguments_that_are_no_utf8_or_hold_line_breaks_and_debug_overrides_are_one_line(inputs):
    """Regressions found by the fuzzing: an argument that is no UTF-8 (Python holds it as lone
    surrogates, which stderr cannot write) was a traceback while reporting the mistake; an
    unrecognized argument with a line break was reported over two lines; a bad override with
    --debug was a traceback."""
    for argv in ([b"train", b"caf\xe9.yaml"], [b"train", inputs["bad_yaml"].encode(), b"--bogus\nflag"],
                 [b"train", inputs["bad_yaml"].encode(), b"not-an-override", b"--debug"]):
        proc = subprocess.run([sys.executable.encode(), b"-m", b"launch.cli", *argv], capture_output=True, cwd=REPO,
                              env=trainer_env(), timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(b"finetrain: "), (argv, proc.stderr)
    assert b"caf\\udce9.yaml: no such config file" in subprocess.run(
        [sys.executable.encode(), b"-m", b"launch.cli", b"train", b"caf\xe9.yaml"], capture_output=True, cwd=REPO,
        env=trainer_env(), timeout=300).stderr
