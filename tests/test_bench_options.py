"""`prism-edge bench BENCH`: each bench's flags come from its options dataclass, and only its own flags are taken."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import subprocess
import sys

import pytest

from prism_edge.app.cli import build_parser, main
from prism_edge.bench.options import BENCHES, CHAT_QUESTIONS, GenerationOptions, SchemesOptions
from prism_edge.flags import dataclass_args, flag_fields


def _bench_parser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = next(a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    return bench.choices[name]


@pytest.mark.parametrize("name", list(BENCHES))
def test_each_bench_flags_come_from_its_dataclass(name):
    options = BENCHES[name]
    flags = {a.dest: a for a in _bench_parser(name)._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in flag_fields(options)}  # one flag per field, no other
    for f in dataclasses.fields(options):
        assert flags[f.name].default == f.default, f.name  # the defaults are the dataclass's
    assert options.from_args(build_parser().parse_args(["bench", name])) == options()


def test_flags_give_the_options_back():
    """Non-default options written as flags parse back to themselves (tuples, aliases and paths included)."""
    parser = build_parser()
    for given in (SchemesOptions(out="elsewhere", link=("wifi", "50mbit,10ms"), devices=4, schemes=("full", "prism:16"),
                                 repeats=2, length=64),
                  GenerationOptions(link=("loopback",), devices=(2, 4), prompt_lengths=(64,),
                                    variants=("defaults@local",), modes=("local", "handoff"), name="short")):
        back = type(given).from_args(parser.parse_args(["bench", given.bench, *dataclass_args(given)]))
        assert back == given
    old = parser.parse_args(["bench", "generation", "--device-counts", "2", "4"])  # the simulator bench's spelling
    assert GenerationOptions.from_args(old).devices == (2, 4)


@pytest.mark.parametrize("argv, owner", [
    (["runtime", "--trials", "3"], "faults"),
    (["overhead", "--link", "wifi"], "schemes, generation, runtime, stages and plan"),
    (["targets", "--model", "minilm"], "schemes, generation, overhead, runtime, hetero, stages, plan and load"),
    (["schemes", "--device-counts", "2"], "generation and runtime"),
])
def test_a_flag_of_another_bench_is_refused(argv, owner, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"unrecognized arguments: {' '.join(argv[1:])}; {argv[1]} is a flag of bench {owner}, not of bench " \
           f"{argv[0]} (see prism-edge bench {argv[0]} --help)" in err


def test_a_flag_of_another_bench_is_refused_from_the_shell():
    proc = subprocess.run([sys.executable, "-m", "prism_edge", "bench", "runtime", "--trials", "3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--trials is a flag of bench faults" in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv, match", [
    (["faults", "--trials", "0"], "--trials must be an integer >= 1, got 0"),
    (["schemes", "--schemes", "full", "pipeline"], "--schemes: unknown scheme 'pipeline'"),
    (["schemes", "--link", "moon"], "--link: bad link 'moon'"),
    (["runtime", "--link", "loopback"], "--link: bad link 'loopback'"),
    (["generation", "--devices", "1", "4"], "--devices: one device is every table's first row"),
    (["generation", "--variants", "defaults@fast"], "unknown decode mode 'fast'"),
    (["generation", "--chat-prompts", "7"], "there are 6 chat questions"),
])
def test_bad_values_are_refused_before_anything_runs(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err


def test_the_dataclasses_check_python_callers_too():
    with pytest.raises(ValueError, match="--repeats must be an integer >= 1"):
        SchemesOptions(repeats=0)
    with pytest.raises(ValueError, match="--link takes one or more words"):
        SchemesOptions(link="wifi")  # a string, not a tuple
    with pytest.raises(ValueError, match="--prompt-lengths takes one or more integers"):
        GenerationOptions(prompt_lengths=())


@pytest.mark.parametrize("name", list(BENCHES))
def test_every_bench_main_takes_its_options(name):
    options = BENCHES[name]
    params = list(inspect.signature(importlib.import_module(options.entry).main).parameters.values())
    assert [p.name for p in params] == ["options", "cache"]
    assert params[0].annotation in (options.__name__, options)


def test_the_generation_bench_is_one_module_with_its_rank0_entry(monkeypatch, tmp_path):
    """With --link it starts rank 0 as `python -m prism_edge.bench.generation --rank0 ...`, whose flags parse."""
    from prism_edge.bench import generation
    from prism_edge.bench.common import Placement
    from prism_edge.config import PrismConfig

    assert len(generation.CHAT) == CHAT_QUESTIONS
    started = []

    def fake_run(place, commands, timeout=0):
        started.extend(commands)
        return '[{"ttft_s": 1, "tok_s": 2, "mode": "local", "bytes": {"prefill": 3, "handoff": 0, "per_token": 8}}]'

    monkeypatch.setattr(generation, "run_ranks", fake_run)
    row = generation.run_scheme(Placement(), "smollm2", PrismConfig(devices=2, cr=16), "auto", None, 64, 1, 4, None)
    assert row["ttft_s"] == 1 and len(started) == 2
    head = started[0]
    assert head[1:4] == ["-m", "prism_edge.bench.generation", "--rank0"]
    args = generation._args(head[3:])
    assert (args.model, args.length, args.count, args.new, args.decode) == ("smollm2", 64, 1, 4, "auto")
    proc = subprocess.run([sys.executable, "-m", "prism_edge.bench.generation", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--rank0" in proc.stdout, proc.stderr
