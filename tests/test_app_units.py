"""Application-layer pieces that need no device processes: stop strings over streamed tokens, pooling
configurations, the per-request stats record, the testing hooks read from the environment."""

from __future__ import annotations

import json

import pytest
import torch

from prism_edge.cluster import env
from prism_edge.app.serve.embeddings import Pooling
from prism_edge.app.serve.textstream import TextStream
from prism_edge.runtime.stats import DeviceReport, Stats
from prism_edge.runtime.wire import ERROR_ROWS, REPORT_COLUMNS, report_buffer, report_from, report_tensor


class Pieces:
    """A tokenizer whose token i decodes to pieces[i] (bytes joined, so a character may span tokens)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_strings_hold_back_what_may_still_stop():
    tok = Pieces([b"Hel", b"lo", b" wor", b"ld", b"\n\nUs", b"er:", b" more"])
    stream = TextStream(tok, ["\n\nUser:"])
    shown = [stream.push(i) for i in range(6)]
    assert shown == ["Hel", "lo", " wor", "ld", "", ""] and stream.stopped and stream.text == "Hello world"
    assert stream.push(6) == "" and stream.flush() == ""  # nothing after the stop, ever


def test_text_without_a_stop_is_shown_whole_and_characters_are_never_split():
    tok = Pieces([b"caf", b"\xc3", b"\xa9 ", b"ok"])  # "é" spans two tokens
    stream = TextStream(tok, ["never"])
    assert [stream.push(i) for i in range(4)] == ["caf", "", "é ", "ok"]
    assert stream.flush() == "" and not stream.stopped and stream.text == "café ok"
    held = TextStream(tok, ["ok!"])
    assert "".join(held.push(i) for i in range(4)) == "café " and held.flush() == "ok"  # "ok" might have been "ok!"


def test_pooling_follows_the_sentence_transformers_folder(tmp_path):
    assert Pooling.of(None) == Pooling(("mean_tokens",), 512)
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "sentence_transformers.models.Transformer"},
                                                       {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                    "pooling_mode_max_tokens": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    pooling = Pooling.of(tmp_path)
    assert pooling == Pooling(("cls_token", "max_tokens"), 128) and pooling.output_mode == "all"
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])  # (1, 3, 2): the last position is padding
    got = pooling.pool(hidden, torch.tensor([[1, 1, 0]]))
    want = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 3.0, 4.0]]), dim=-1)  # [cls ; max]
    torch.testing.assert_close(got, want)
    mean = Pooling(("mean_tokens",))
    assert mean.output_mode == "mean"  # the cluster sends back per-sequence means, not every position
    torch.testing.assert_close(mean.pool(torch.tensor([[[3.0, 4.0]]]), torch.tensor([[1, 1]])),
                               torch.tensor([[0.6, 0.8]]))


def test_device_report_travels_as_one_tensor():
    report = DeviceReport(sent=(10, 20), received=(30, 40), layer_flops=(5, 6), compute_s=(0.25, 0.5),
                          wait_s=(0.125, 0.0), input_bytes=7, output_bytes=8, flops=99, cpu_s=1.5, peak_rss_kib=2048,
                          stage_sent=11, stage_received=12, param_bytes=13)
    wire = report_tensor(report)
    assert wire.dtype == torch.int64 and wire.shape == report_buffer(2).shape == (4 + ERROR_ROWS, 5)
    assert report_from(wire) == report
    failed = report.__class__(**{**report.__dict__, "error": "in layer 1: RuntimeError: out of memory – ünïcode"})
    assert report_from(report_tensor(failed)).error == failed.error
    long = report_from(report_tensor(report.__class__(**{**report.__dict__, "error": "x" * 5000})))
    assert long.error == "x" * (ERROR_ROWS * REPORT_COLUMNS * 8)  # cut to fit, never an error
    uncounted = report_from(report_tensor(report.__class__(**{**report.__dict__, "layer_flops": None,
                                                               "flops": None})))
    assert uncounted.flops is None and uncounted.layer_flops is None
    stats = Stats.from_reports([report, uncounted], wall_s=2.0)
    assert stats.flops is None and stats.sent == ((10, 10), (20, 20)) and stats.peak_rss_mib == (2.0, 2.0)
    assert stats.compute_s == ((0.25, 0.25), (0.5, 0.5)) and stats.wall_s == 2.0


def test_testing_hooks_name_their_rank():
    environ = {env.FAULT_ENV: "2:hang@1", env.SLOW_ENV: "1:1.5"}
    assert env.fault(2, environ) == ("hang", 1, 1) and env.fault(1, environ) is None
    assert env.fault(1, {env.FAULT_ENV: "1:raise@3#2"}) == ("raise", 3, 2)
    assert env.fault(1, {env.FAULT_ENV: "1:melt@3"}) is None
    assert env.slowdown(1, environ) == 1.5 and env.slowdown(0, environ) == 0.0
    with pytest.raises(ValueError, match="RANK:FACTOR"):
        env.slowdown(1, {env.SLOW_ENV: "1:fast"})
    assert env.cache_dir({env.CACHE_ENV: "/x"}).as_posix() == "/x"
    assert env.torchrun_seat({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "9"}) == (
        1, 2, "h:9", False)


def test_cluster_docstring_lists_the_settings_it_takes():
    """Cluster(model, **settings) takes every LaunchSpec field but the model (its own argument), and only those."""
    import dataclasses
    import re

    from prism_edge.cluster import Cluster
    from prism_edge.cluster.spec import LaunchSpec

    doc = " ".join((Cluster.__doc__ or "").split())
    listed = re.search(r"settings: any other LaunchSpec field \(([^)]*)\)", doc)
    assert listed is not None
    names = {f.name for f in dataclasses.fields(LaunchSpec)} - {"model"}
    assert set(listed.group(1).split(", ")) == names
    assert LaunchSpec.with_settings("minilm", {n: getattr(LaunchSpec(), n) for n in names}) == LaunchSpec()
    with pytest.raises(ValueError, match="unknown Cluster setting"):
        LaunchSpec.with_settings("minilm", {"debug": True})
