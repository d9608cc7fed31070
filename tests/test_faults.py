"""Fault injection: nothing a client sends takes the cluster down, a device that fails inside one request
fails only that request, and start-up always ends with a message that names what is wrong.

Every bad input below goes to a running cluster (the Python API, HTTP, or the CLI in this process), must
be refused with an error that names the field (ValueError / HTTP 4xx in OpenAI's error shape / exit 2 and
one line on stderr), and the cluster must then answer a good request exactly as the simulator does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from conftest import VOCAB, image_batch, saved_models, text_batch, tiny
from prism_edge import PrismConfig, simulate
from prism_edge.cluster import Cluster, RequestError
from prism_edge.runtime.generate import Sampling

CFG = PrismConfig(devices=3, cr=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("fault-models"), ["bert", "llama-lm", "vit"])


def _good(name: str) -> dict:
    if name == "vit":
        return {"pixel_values": image_batch()}
    ids, mask = text_batch(batch=2, length=11, pad_to=[11, 7])
    return {"input_ids": ids, "attention_mask": mask}


def _still_serves(cluster: Cluster, name: str) -> None:
    inputs = _good(name)
    out = cluster(**inputs)
    ref = simulate(tiny(name), cluster.cfg, **inputs, count_flops=False)
    key = "last_hidden_state" if name != "llama-lm" else "logits"
    assert (getattr(out, key) - getattr(ref, key)).abs().max() < 1e-4
    assert cluster.alive


ids, mask = text_batch(batch=1, length=5)
LONG = torch.randint(3, VOCAB, (1, 80))  # the tiny models have 64 positions

# (what, inputs, words the error must contain): through Cluster.__call__
BAD_API = {
    "bert": [
        ("float ids", {"input_ids": ids.float() + 0.5}, "input_ids"),
        ("id beyond vocabulary", {"input_ids": torch.tensor([[5, 6, VOCAB + 3]])}, "vocabulary"),
        ("negative id", {"input_ids": torch.tensor([[5, -1, 6]])}, "vocabulary"),
        ("token type 7", {"input_ids": ids, "token_type_ids": torch.tensor([[0, 0, 7, 0, 0]])}, "token_type_ids"),
        ("empty sequence", {"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "input_ids"),
        ("batch of 0", {"input_ids": torch.zeros(0, 5, dtype=torch.long)}, "input_ids"),
        ("3-d ids", {"input_ids": ids[None]}, "input_ids"),
        ("1-d ids", {"input_ids": ids[0]}, "input_ids"),
        ("mask of 2s", {"input_ids": ids, "attention_mask": torch.full((1, 5), 2)}, "attention_mask"),
        ("mask of another shape", {"input_ids": ids, "attention_mask": torch.ones(1, 4, dtype=torch.long)},
         "attention_mask"),
        ("too long", {"input_ids": LONG}, "position"),
        ("positions beyond the table", {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 500]])},
         "position"),
        ("pixels to a text model", {"pixel_values": image_batch()}, "pixel_values"),
        ("a list, not a tensor", {"input_ids": [[5, 6, 7]]}, "input_ids"),
        ("nothing", {}, "input"),
        ("all padding", {"input_ids": ids, "attention_mask": torch.zeros(1, 5, dtype=torch.long)},
         "attention_mask"),
    ],
    "llama-lm": [
        ("token types to llama", {"input_ids": ids, "token_type_ids": torch.zeros(1, 5, dtype=torch.long)},
         "token_type_ids"),
        ("id beyond vocabulary", {"input_ids": torch.tensor([[5, 6, 10**6]])}, "vocabulary"),
        ("float ids", {"input_ids": ids.double()}, "input_ids"),
        ("too long", {"input_ids": LONG}, "position"),
    ],
    "vit": [
        ("one channel", {"pixel_values": torch.randn(1, 1, 32, 32)}, "channels"),
        ("NaN pixels", {"pixel_values": torch.full((1, 3, 32, 32), float("nan"))}, "pixel"),
        ("3-d pixels", {"pixel_values": torch.randn(3, 32, 32)}, "pixel_values"),
        ("integer pixels", {"pixel_values": torch.zeros(1, 3, 32, 32, dtype=torch.long)}, "pixel_values"),
        ("ids to an image model", {"input_ids": ids}, "pixel_values"),
        ("empty batch", {"pixel_values": torch.zeros(0, 3, 32, 32)}, "pixel_values"),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama-lm", "vit"])
def test_bad_requests_through_the_api_leave_the_cluster_serving(saved, name):
    with Cluster(saved[name], CFG, timeout=20) as cluster:
        problems = []
        for what, inputs, words in BAD_API[name]:
            t0 = time.monotonic()
            try:
                cluster(**inputs)
                problems.append(f"{what}: accepted")
            except ValueError as err:
                if words not in str(err) or "\n" in str(err) or time.monotonic() - t0 > 1.0:
                    problems.append(f"{what}: {err}")
            except Exception as err:  # noqa: BLE001 - collected: every wrong answer is listed at once
                problems.append(f"{what}: {type(err).__name__}: {err}")
            _still_serves(cluster, name)
        assert not problems, "\n".join(problems)
        with pytest.raises(ValueError, match="outputs"):
            cluster(**_good(name), outputs="everything")
        with pytest.raises(ValueError, match="outputs"):
            cluster(**_good(name), outputs=5)  # type: ignore[arg-type]
        _still_serves(cluster, name)


BAD_GENERATE = [
    ("seed beyond int64", dict(sampling="seed"), "seed"),
    ("max_new_tokens -5", dict(max_new_tokens=-5), "max_new_tokens"),
    ("max_new_tokens 1e30", dict(max_new_tokens=1e30), "max_new_tokens"),
    ("max_new_tokens past the positions", dict(max_new_tokens=100), "positions"),
    ("stop ids as text", dict(stop_ids="abc"), "stop_ids"),
    ("stop id beyond vocabulary", dict(stop_ids=[VOCAB]), "stop_ids"),
    ("a sampling that is not one", dict(sampling={"temperature": 2}), "sampling"),
    ("on_token not callable", dict(on_token=5), "on_token"),
    ("unknown decode mode", dict(decode="fast"), "decode"),
    ("two prompts", dict(input_ids=torch.randint(3, VOCAB, (2, 5))), "one prompt"),
    ("empty prompt", dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "prompt"),
]


@pytest.mark.slow
def test_bad_generation_requests_and_sampling_settings(saved):
    prompt, _ = text_batch(batch=1, length=9)
    problems: list[str] = []
    with Cluster(saved["llama-lm"], CFG, timeout=20) as cluster:
        for what, kwargs, words in BAD_GENERATE:
            kwargs = {"input_ids": prompt, "max_new_tokens": 4, **kwargs}
            if kwargs.get("sampling") == "seed":
                with pytest.raises(ValueError, match="seed"):
                    Sampling(do_sample=True, seed=1180591620717411303424)
                continue
            try:
                cluster.generate(**kwargs)
                problems.append(f"{what}: accepted")
            except ValueError as err:
                if words not in str(err):
                    problems.append(f"{what}: {err}")
            except Exception as err:  # noqa: BLE001
                problems.append(f"{what}: {type(err).__name__}: {err}")
        for bad in (dict(temperature=0.0, do_sample=True), dict(top_p=2.0), dict(top_k=-1), dict(seed="abc"),
                    dict(temperature=float("nan"))):
            with pytest.raises(ValueError):
                Sampling(**bad)
        assert not problems, "\n".join(problems)
        assert cluster.generate(prompt, max_new_tokens=4).new_ids  # still serving
        _still_serves(cluster, "llama-lm")


# ----------------------------------------------------------------------------------- a device that fails
def test_a_device_failing_inside_a_request_fails_only_that_request(saved, capfd):
    """Rank 1 raises in layer 1 of request 1 (before its message went out); rank 2 after its message of
    layer 0 went out in request 2; rank 0's own layer raises in request 4.  Each such request is refused
    with RequestError naming the rank; every other request is answered as the simulator does."""
    env = {"PRISM_EDGE_FAULT": "1:raise@1#1,2:late@0#2"}
    with Cluster(saved["bert"], CFG, timeout=20, worker_env=env) as cluster:
        inputs = _good("bert")
        with pytest.raises(RequestError, match="rank 1 failed in layer 1: InjectedFault") as err:
            cluster(**inputs)
        assert err.value.ranks == [1] and "still up" in str(err.value)
        with pytest.raises(RequestError, match="rank 2 failed in layer 0"):
            cluster(**inputs)
        _still_serves(cluster, "bert")
        adapter, original = cluster.adapter, cluster.adapter.after_attention

        def boom(*args):
            raise RuntimeError("CUDA out of memory (pretend)")

        adapter.after_attention = boom  # rank 0's own share fails
        try:
            with pytest.raises(RequestError, match="rank 0 failed in layer 0: RuntimeError: CUDA out of memory"):
                cluster(**inputs)
        finally:
            adapter.after_attention = original
        _still_serves(cluster, "bert")
        assert cluster.alive and cluster.workers.procs[1].poll() is None
    err_text = capfd.readouterr().err
    assert "rank 1: request failed in layer 1" in err_text and "serving the next one" in err_text


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_a_device_failing_while_decoding_fails_only_that_generation(saved, mode):
    from prism_edge.runtime.generate import generate

    prompt, _ = text_batch(batch=1, length=13)
    fault = "2:decode@1#1" if mode == "local" else "1:decode@0#1"  # the last device / an earlier one
    cfg = PrismConfig(devices=3, cr=4)
    with Cluster(saved["llama-lm"], cfg, timeout=20, worker_env={"PRISM_EDGE_FAULT": fault}) as cluster:
        with pytest.raises(RequestError, match="rank (1|2) failed"):
            cluster.generate(prompt, max_new_tokens=6, decode=mode)
        want = generate(tiny("llama-lm"), cluster.cfg, prompt, max_new_tokens=6, decode=mode)
        assert cluster.generate(prompt, max_new_tokens=6, decode=mode).new_ids == want.new_ids
        _still_serves(cluster, "llama-lm")


@pytest.mark.slow
def test_a_device_failing_in_a_prefill_abandons_the_generation(saved):
    prompt, _ = text_batch(batch=1, length=13)
    with Cluster(saved["llama-lm"], CFG, timeout=20, worker_env={"PRISM_EDGE_FAULT": "2:raise@0#1"}) as cluster:
        with pytest.raises(RequestError, match="rank 2 failed in layer 0"):
            cluster.generate(prompt, max_new_tokens=6, decode="handoff")
        assert len(cluster.generate(prompt, max_new_tokens=6, decode="handoff").new_ids) == 6


# ----------------------------------------------------------------------------------------------- HTTP
@contextlib.contextmanager
def _serving(path: str, cfg: PrismConfig, timeout: float = 10.0, **options):
    from serving import serving

    with Cluster(path, cfg, timeout=20) as cluster, serving(cluster, client_timeout=timeout, **options) as url:
        yield cluster, url


def _call(url: str, body: object = None, method: str = "POST", raw: bytes | None = None,
          headers: dict | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


GOOD_IDS = [[5, 6, 7, 8, 9, 10]]
# (route, body, the field the error must name)
BAD_HTTP = {
    "bert": [
        ("/v1/forward", {"input_ids": [[5.5, 6.25, 7.0]]}, "input_ids"),
        ("/v1/forward", {"input_ids": [[5, 6, 7, 8, 9]], "token_type_ids": [[0, 0, 7, 0, 0]]}, "token_type_ids"),
        ("/v1/forward", {"input_ids": [[]]}, "input_ids"),
        ("/v1/forward", {"input_ids": [[5, 6], [7]]}, "input_ids"),
        ("/v1/forward", {"input_ids": [["x", "y"]]}, "input_ids"),
        ("/v1/forward", {"input_ids": [[5, 6, 10**30]]}, "input_ids"),
        ("/v1/forward", {"input_ids": [[5, 6, VOCAB]]}, "vocabulary"),
        ("/v1/forward", {"input_ids": [[True, False]]}, "input_ids"),
        ("/v1/forward", {"input_ids": GOOD_IDS, "attention_mask": [[1, 1, 1]]}, "attention_mask"),
        ("/v1/forward", {"input_ids": [list(range(3, 83))]}, "position"),
        ("/v1/forward", {"input_ids": GOOD_IDS, "outputs": "everything"}, "outputs"),
        ("/v1/forward", {"input_ids": GOOD_IDS, "outputs": 5}, "outputs"),
        ("/v1/forward", {"texts": []}, "texts"),
        ("/v1/forward", {"texts": [" ".join(["word"] * 200)]}, "positions"),  # truncated only when asked:
        ("/v1/forward", {"texts": "hello", "max_length": -5}, "texts"),
        ("/v1/forward", {"pixel_values": [[[[0.5]]]]}, "pixel_values"),
        ("/v1/forward", {"nothing": 1}, "input_ids"),
        ("/v1/forward", [1, 2, 3], "JSON object"),
        ("/v1/generate", {"input_ids": GOOD_IDS}, "causal"),
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/completions", {"prompt": "hi"}, "causal"),
    ],
    "llama-lm": [
        ("/v1/generate", {"input_ids": GOOD_IDS, "seed": 1180591620717411303424}, "seed"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "seed": "abc"}, "seed"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "max_new_tokens": -5}, "max_new_tokens"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "max_new_tokens": 1e30}, "max_new_tokens"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "max_new_tokens": "x"}, "max_new_tokens"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "max_new_tokens": 500}, "positions"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "temperature": "hot", "do_sample": True}, "temperature"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "temperature": 0, "do_sample": True}, "temperature"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "top_p": 7}, "top_p"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "top_k": -3}, "top_k"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "do_sample": "yes"}, "do_sample"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "stop_ids": ["x"]}, "stop_ids"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "stop_ids": [VOCAB + 1]}, "stop_ids"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "stop_ids": 5}, "stop_ids"),
        ("/v1/generate", {"input_ids": GOOD_IDS, "decode": "fast"}, "decode"),
        ("/v1/generate", {"input_ids": [[5, 6], [7, 8]]}, "one prompt"),
        ("/v1/generate", {"input_ids": [[]]}, "input_ids"),
        ("/v1/generate", {"input_ids": [[5.5, 6]]}, "input_ids"),
        ("/v1/generate", {"prompt": 5}, "prompt"),
        ("/v1/generate", {"prompt": "hello"}, "prompt"),
        ("/v1/generate", {}, "prompt"),
        ("/v1/forward", {"input_ids": GOOD_IDS, "token_type_ids": [[0] * 6]}, "token_type_ids"),
        ("/v1/forward", {"input_ids": GOOD_IDS, "top_k": 0}, "top_k"),
        ("/v1/forward", {"input_ids": GOOD_IDS, "top_k": 10**9}, "top_k"),
        ("/v1/forward", {"input_ids": GOOD_IDS, "return_logits": "yes"}, "return_logits"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "model"),
        ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "tokenizer"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop"),
    ],
}


def _good_http(cluster: Cluster, url: str, name: str) -> None:
    status, reply = _call(url + "/v1/forward", {"input_ids": GOOD_IDS})
    assert status == 200, reply
    status, health = _call(url + "/health", method="GET")
    assert status == 200 and health["alive"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama-lm"])
def test_bad_http_requests_get_a_field_named_400_and_the_server_goes_on(saved, name):
    with _serving(saved[name], CFG) as (cluster, url):
        problems = []
        for route, body, words in BAD_HTTP[name]:
            if route.startswith(("/v1/completions", "/v1/chat", "/v1/embeddings")) and "model" not in body:
                body = {"model": saved[name], **body}  # OpenAI's clients always name the model
            t0 = time.monotonic()
            status, reply = _call(url + route, body)
            took = time.monotonic() - t0
            error = reply.get("error", {})
            text = f"{error.get('param')} {error.get('message')}"
            if not (400 <= status < 500 and set(error) == {"message", "type", "param", "code"} and took < 1.0
                    and words in text):
                problems.append(f"{route} {json.dumps(body)[:80]}: {status} in {took:.2f} s: {text}")
            _good_http(cluster, url, name)
        assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_http_protocol_abuse(saved):
    """Broken framing, huge bodies, wrong methods and stalled clients: a 4xx each, and the server goes on."""
    with _serving(saved["bert"], CFG, timeout=2.0) as (cluster, url):
        host, port = url.removeprefix("http://").split(":")
        cases = [
            (dict(raw=b"{not json"), 400),
            (dict(raw=b""), 400),
            (dict(raw=b'"just a string"'), 400),
            (dict(raw=b"[" * 100000), 400),
            (dict(raw=b"\xff\xfe"), 400),
            (dict(body={"input_ids": GOOD_IDS}, method="PUT"), 405),
            (dict(body={"input_ids": GOOD_IDS}, method="DELETE"), 405),
        ]
        for kwargs, want in cases:
            status, reply = _call(url + "/v1/forward", **kwargs)
            assert status == want and "error" in reply, (kwargs, status, reply)
        assert _call(url + "/v2/nothing", {})[0] == 404
        long = {"texts": [" ".join(["word"] * 200)], "max_length": 32}
        assert _call(url + "/v1/forward", long)[1]["tokens"] == [32]  # truncated where asked
        assert _call(url + "/v1/models/other", method="GET")[0] == 404

        def raw_request(head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
            with socket.create_connection((host, int(port)), timeout=wait) as s:
                s.sendall(head + body)
                chunks = []
                with contextlib.suppress(OSError):
                    while chunk := s.recv(65536):
                        chunks.append(chunk)
                return b"".join(chunks)

        t0 = time.monotonic()
        big = raw_request(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n", b"{" * 1000)
        assert b" 413 " in big.split(b"\r\n")[0] and time.monotonic() - t0 < 1.0, big[:200]
        bad_len = raw_request(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert b" 400 " in bad_len.split(b"\r\n")[0], bad_len[:200]

        # a client that announces 1000 bytes and sends 11: it holds only its own connection
        stalled = socket.create_connection((host, int(port)), timeout=10)
        stalled.sendall(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"input_ids")
        served, t0 = [], time.monotonic()
        for _ in range(20):
            served.append(_call(url + "/v1/forward", {"input_ids": GOOD_IDS})[0])
        assert served == [200] * 20
        answer = stalled.recv(65536)
        stalled.close()
        assert b" 408 " in answer.split(b"\r\n")[0], answer[:200]
        # a client that connects and says nothing is dropped after the socket timeout
        with socket.create_connection((host, int(port)), timeout=10) as silent:
            t0 = time.monotonic()
            assert silent.recv(100) == b"" or True
            assert time.monotonic() - t0 < 5
        _good_http(cluster, url, "bert")


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_bad_command_lines_get_one_line_and_exit_2(saved, tmp_path, capsys):
    from prism_edge.app.cli import main

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(open(f"{saved['bert']}/config.json").read())
    (corrupt / "model.safetensors").write_bytes(open(f"{saved['bert']}/model.safetensors", "rb").read()[:500])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(f"{saved['bert']}/config.json").read())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    words = " ".join(["word"] * 3000)
    cases = [
        (["run", "--model", saved["bert"], "--text", words, "--max-length", "300"], "64"),
        (["run", "--model", str(corrupt)], "model.safetensors"),
        (["run", "--model", str(pickled)], "pytorch_model.bin"),
        (["run", "--model", str(empty)], "config.json"),
        (["run", "--model", str(tmp_path / "absent")], "absent"),
        (["run", "--model", saved["bert"], "--cr", "0"], "cr"),
        (["run", "--model", saved["bert"], "--devices", "0"], "devices"),
        (["run", "--model", saved["bert"], "--weights", "inf", "1", "--devices", "2"], "weights"),
        (["run", "--model", saved["bert"], "--weights", "1", "--devices", "2"], "weights"),
        (["run", "--model", saved["bert"], "--window", "-1"], "window"),
        (["run", "--model", saved["bert"], "--topk-frac", "2"], "topk"),
        (["run", "--model", saved["vit"], "--image", str(tmp_path / "none.png")], "none.png"),
        (["run", "--model", saved["bert"], "--text-file", str(tmp_path / "none.txt")], "none.txt"),
        (["run", "--text", ""], "text"),
        (["run", "--text", words, "--max-length", "0"], "max_length"),
        (["launch", "--text", ""], "text"),
        (["launch", "--repeat", "0", "--model", saved["bert"]], "repeat"),
        (["generate", "--model", saved["bert"], "hello"], "causal"),
        (["generate", "hello", "--max-new-tokens", "-3"], "max-new-tokens"),
        (["generate", "", ], "prompt"),
        (["generate", "hello", "--plan", "auto"], "--launch"),
        (["launch", "--fidelity", "fast", "--model", saved["bert"]], "fidelity"),
        (["plan", "--lengths", "0", "--model", saved["bert"]], "lengths"),
        (["eval", "--task", "nonsense"], "task"),
        (["worker", "--rank", "5", "--world-size", "2", "--model", saved["bert"]], "--rank"),
        (["worker", "--rank", "1", "--world-size", "2", "--master", "nohost", "--model", saved["bert"]], "--master"),
    ]
    problems = []
    for argv, words_ in cases:
        try:
            code = main(argv, hard_exit=False)
        except BaseException as exc:  # noqa: BLE001 - a raw exception is what this test exists to catch
            code = f"raised {type(exc).__name__}: {exc}"
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if line.startswith("prism-edge: error:")]
        # progress lines (loading, spawning) may come first; the error is one line, the last
        if code != 2 or "Traceback" in err or len(errors) != 1 or not err.endswith(errors[0]) \
                or words_.lower() not in errors[0].lower():
            problems.append(f"{' '.join(argv)[:90]}: exit {code}: {err[-300:]}")
    assert not problems, "\n".join(problems)


@pytest.mark.real
def test_a_text_longer_than_the_model_is_truncated_where_asked_and_refused_where_not(minilm, capsys):
    from prism_edge.app.cli import main

    words = " ".join(["word"] * 3000)
    assert main(["run", "--model", "minilm", "--text", words, "--devices", "2"], hard_exit=False) == 0  # to 512
    capsys.readouterr()
    code = main(["run", "--model", "minilm", "--text", words, "--devices", "2", "--max-length", "4000"],
                hard_exit=False)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "512" in err and err.startswith("prism-edge: error:"), err


# ------------------------------------------------------------------------------------------- start-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model: str, timeout: float = 30, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prism_edge.worker", "--rank", str(rank), "--world-size", str(world),
           "--master", f"127.0.0.1:{port}", "--model", model, "--startup-timeout", str(timeout),
           "--devices", str(world), "--max-length", "32", *flags]
    import signal  # SIGINT at its default, as from a terminal (shells start background jobs with it ignored)

    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_startup_refuses_a_duplicate_rank_and_a_wrong_world_size_by_name(saved):
    import signal

    port = _free_port()
    serve = ("--serve", "127.0.0.1:0")  # rank 0 stays up, so the duplicate meets the group however late it comes
    procs = [_worker(0, 2, port, saved["bert"], 30, *serve), _worker(1, 2, port, saved["bert"]),
             _worker(1, 2, port, saved["bert"])]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs[1:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        loser = next(p for p in procs[1:] if p.poll() is not None)
        refused = loser.communicate(timeout=10)[1]
        assert loser.returncode == 2, refused[-2000:]
        assert "rank 1 is taken twice" in refused and "Traceback" not in refused, refused[-2000:]
        assert procs[0].poll() is None  # the group formed with the other rank 1 and serves
    finally:
        procs[0].send_signal(signal.SIGINT)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=60)
            if p.poll() is None:
                p.kill()

    port = _free_port()
    t0 = time.monotonic()
    procs = [_worker(0, 2, port, saved["bert"]), _worker(1, 3, port, saved["bert"])]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 2 for p in procs), [o[1][-800:] for o in outs]
    assert all("--world-size" in o[1] and "Traceback" not in o[1] for o in outs), [o[1][-800:] for o in outs]
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_startup_with_a_missing_rank_ends_at_the_timeout_on_every_rank(saved):
    port = _free_port()
    t0 = time.monotonic()
    procs = [_worker(0, 3, port, saved["bert"], 6), _worker(2, 3, port, saved["bert"], 6)]
    outs = [p.communicate(timeout=120) for p in procs]
    took = time.monotonic() - t0
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 3, err[-2000:]
        assert "rank(s) 1 of 3 did not join" in err and "Traceback" not in err, err[-2000:]
    assert took < 6 + 30  # the timeout, plus starting Python and torch twice on a shared machine


# ------------------------------------------------------------------------------------- two machines
def _readme_commands() -> tuple[list[str], list[str]]:
    """The README's two-machine commands (rank 0 with torchrun, the plain worker pair), as written."""
    import re
    from pathlib import Path

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    block = text[text.index("# machine A (rank 0, 192.168.1.10)"):]
    block = block[: block.index("```")].replace("\\\n", " ")
    lines = [" ".join(line.split()) for line in block.splitlines() if line.strip() and not line.startswith("#")]
    torchrun = [line for line in lines if line.startswith("torchrun")]
    plain = [line for line in lines if line.startswith("prism-edge worker")]
    assert len(torchrun) == 2 and len(plain) == 2 and all(re.search(r"192\.168\.1\.10", x) for x in lines), lines
    return torchrun, plain


@pytest.mark.slow
@pytest.mark.parametrize("which", ["torchrun", "worker"])
def test_readme_two_machine_commands_run_as_written_in_network_namespaces(saved, which, tmp_path):
    """Two hosts (network namespaces joined by a hub), each with a host name that resolves to a loopback
    address as Debian sets it up; the README's commands with only the addresses, model and request swapped."""
    from prism_edge.bench.links import EmulatedNetwork, available, parse_link

    ok, why = available()
    if not ok:
        pytest.skip(why)
    if shutil.which("iptables-legacy") is None:  # the "lan" link's delay (.ci/run installs iptables)
        pytest.skip("link delay needs iptables-legacy: apt-get install iptables")
    torchrun, plain = _readme_commands()
    lines = torchrun if which == "torchrun" else plain
    bindir = os.path.dirname(sys.executable)
    with EmulatedNetwork(2, parse_link("lan"), prefix="pef") as net:
        procs = []
        for rank, line in enumerate(lines):
            line = line.replace("192.168.1.10", net.address(0)).replace("--model minilm", f"--model {saved['bert']}")
            line = line.replace("--serve 0.0.0.0:8000", "--max-length 32 --repeat 2")
            argv = line.split()
            argv[0] = os.path.join(bindir, argv[0])
            env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
            procs.append(subprocess.Popen(net.wrap(rank, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
        outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 device processes" in outs[0][0] and "on the wire:" in outs[0][0], outs[0]
