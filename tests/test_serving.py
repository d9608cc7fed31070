"""The HTTP server as a shared service: API keys, the bounded queue, metrics, dynamic batching, shutdown.

The endpoints' own behaviour (fields, errors, OpenAI's client) is tested in test_runtime, test_faults and
test_openai; here, what the server adds around them.  Batched answers are compared with the lone answers of
the same server (and those with the simulator elsewhere).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from conftest import saved_models, text_batch
from prism_edge import PrismConfig
from prism_edge.cluster import Cluster
from serving import serving, until_serving

KEY = "sk-test-0123456789"
PROTECTED = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("POST", "/v1/forward", {"input_ids": [[5, 6]]}),
             ("POST", "/v1/embeddings", {"model": "m", "input": "hi"}), ("POST", "/v1/generate", {"prompt": "hi"}),
             ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}),
             ("POST", "/v1/chat/completions", {"model": "m", "messages": []})]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("serving-models"), ["bert", "llama-lm"])


@pytest.fixture(scope="module")
def bert(saved):
    with Cluster(saved["bert"], PrismConfig(devices=2, cr=4), timeout=20) as cluster:
        yield cluster


def call(url: str, body: object = None, method: str = "POST", key: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            raw = reply.read()
            return reply.status, (json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}), \
                {k.lower(): v for k, v in reply.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), {k.lower(): v for k, v in err.headers.items()}


def test_api_keys_guard_every_route_but_health(bert, saved):
    openai = pytest.importorskip("openai")
    with serving(bert, keys=(KEY, "sk-other")) as url:
        assert call(url + "/health", method="GET")[0] == 200
        for method, route, body in PROTECTED:
            for key in (None, "wrong", KEY[:-1]):
                status, reply, headers = call(url + route, body, method, key)
                assert status == 401, (route, key, status, reply)
                assert set(reply["error"]) == {"message", "type", "param", "code"}
                assert reply["error"]["code"] == "invalid_api_key" and headers.get("www-authenticate") == "Bearer"
                assert KEY not in json.dumps(reply)
        status, reply, _ = call(url + "/v1/forward", {"input_ids": [[5, 6, 7]]}, key="sk-other")
        assert status == 200 and reply["outputs"]
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        emb = client.embeddings.create(model=saved["bert"], input=[[5, 6, 7, 8]])
        assert len(emb.data[0].embedding) == bert.adapter.geometry.hidden
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_full_queue_answers_429_with_retry_after_and_metrics_count_it(bert):
    ids = text_batch(batch=1, length=40)[0].tolist()
    with serving(bert, max_queue=2, max_batch=1) as url:
        results: list[tuple[int, dict, dict]] = []
        barrier = threading.Barrier(12)

        def one() -> None:
            barrier.wait()
            results.append(call(url + "/v1/forward", {"input_ids": ids}))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r[0] for r in results)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        busy = next(r for r in results if r[0] == 429)
        assert int(busy[2]["retry-after"]) >= 1 and busy[1]["error"]["code"] == "rate_limit_exceeded"
        assert call(url + "/v1/forward", {"input_ids": ids})[0] == 200  # the queue drained
        text = call(url + "/metrics", method="GET")[1]["text"]
        assert f'prism_requests_total{{route="/v1/forward",status="429"}} {statuses.count(429)}.0' in text
        assert f'prism_requests_total{{route="/v1/forward",status="200"}} {statuses.count(200) + 1}.0' in text
        for device in ("0", "1"):
            sent = [line for line in text.splitlines()
                    if line.startswith(f'prism_exchange_bytes_total{{device="{device}",direction="sent"}}')]
            assert sent and float(sent[0].split()[-1]) > 0
        assert 'prism_device_up{device="1"} 1.0' in text and "prism_request_seconds_bucket" in text


def _together(url: str, bodies: list[dict]) -> list[dict]:
    """Send every body at once (one thread each); the replies in order."""
    replies: list[dict] = [{}] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        barrier.wait()
        status, reply, _ = call(url + "/v1/forward", bodies[i])
        replies[i] = reply if status == 200 else {"status": status, **reply}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def _assert_batched_equal_alone(url: str, bodies: list[dict]) -> int:
    alone = [call(url + "/v1/forward", b)[1] for b in bodies]
    together = _together(url, bodies)
    for a, b in zip(alone, together):
        assert "outputs" in b, b
        torch.testing.assert_close(torch.tensor(b["outputs"]["last_hidden_state"]),
                                   torch.tensor(a["outputs"]["last_hidden_state"]), atol=1e-5, rtol=1e-5)
    return max(b["prism"].get("batch", {}).get("requests", 1) for b in together)


def test_concurrent_requests_run_batched_and_answer_as_alone(bert, saved):
    """PRISM at CR 4 on 2 devices compresses: only requests of the same shape share a batch.  Voltage is exact:
    any widths share one, padded."""
    ids, mask = text_batch(batch=4, length=24, pad_to=[24, 24, 17, 9])
    same = [{"input_ids": ids[i:i + 1].tolist(), "outputs": "all"} for i in (0, 1)] * 3
    mixed = [{"input_ids": ids[i:i + 1, :int(mask[i].sum())].tolist(), "outputs": "all"} for i in range(4)]
    with serving(bert, batch_wait_ms=300) as url:
        assert _assert_batched_equal_alone(url, same) > 1
        assert _assert_batched_equal_alone(url, mixed) >= 1  # never merged across shapes: still equal
    with Cluster(saved["bert"], PrismConfig(devices=2, scheme="voltage"), timeout=20) as voltage, \
            serving(voltage, batch_wait_ms=300) as url:
        assert _assert_batched_equal_alone(url, mixed * 2) > 1
        text = call(url + "/metrics", method="GET")[1]["text"]
        assert "prism_batch_requests_count" in text


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_stops_every_device(saved):
    cmd = [sys.executable, "-m", "prism_edge", "launch", "--devices", "2", "--model", saved["llama-lm"],
           "--serve", "127.0.0.1:0", "--plan", "fixed"]
    env = {**os.environ, "PRISM_EDGE_SLOW": "1:20"}  # rank 1 at 1/21 speed: the generation takes a while
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, pids, lines = until_serving(proc)
        assert url, "".join(lines)
        result: list = []
        worker = threading.Thread(target=lambda: result.append(call(url + "/v1/generate", {
            "input_ids": [[5, 6, 7, 8, 9, 10, 11, 12]], "max_new_tokens": 24, "decode": "distributed"})))
        worker.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        worker.join(120)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert result and result[0][0] == 200 and len(result[0][1]["token_ids"]) == 24, result
    assert proc.returncode == 143 and "terminated" in err, err[-2000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_server_on_a_public_address_without_a_key_warns(bert):
    from prism_edge.app.serve.options import ServeOptions, is_loopback
    from prism_edge.app.serve.server import Server

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert Server(bert, "0.0.0.0", 0).warnings() and not Server(bert, "0.0.0.0", 0, keys=(KEY,)).warnings()
    assert not Server(bert, "127.0.0.1", 0).warnings()
    with pytest.raises(ValueError, match="max_queue"):
        ServeOptions(max_queue=0)


# ----------------------------------------------------------------------------------------------- units
def _job(key, rows: int, width: int, outputs: str = "all"):
    from prism_edge.app.serve.batching import Job

    ids = torch.arange(1, rows * width + 1).reshape(rows, width)
    return Job(key, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, outputs, None, None, None)


def test_the_batcher_groups_equal_keys_and_answers_each_job_its_own_rows():
    from prism_edge.app.serve.batching import Batcher
    from prism_edge.runtime.simulator import PrismOutput

    runs: list[tuple[int, tuple[int, ...]]] = []
    gate = threading.Event()

    def run(inputs, first, jobs):
        gate.wait(5)  # hold the first batch until every job queued
        runs.append((jobs, tuple(inputs["input_ids"].shape)))
        if (inputs["input_ids"] == 999).any():
            raise ValueError("token 999 is beyond the vocabulary")
        hidden = inputs["input_ids"].float().unsqueeze(-1) * inputs["attention_mask"].unsqueeze(-1)
        return PrismOutput(last_hidden_state=hidden, planned={"plan": "fixed"})

    batcher = Batcher(run, max_rows=4, wait_s=0.0, busy=lambda: 0)
    jobs = [_job("a", 1, 3), _job("a", 2, 5), _job("b", 1, 4), _job("a", 1, 2), _job("a", 1, 6)]
    jobs[3].inputs["input_ids"][0, 1] = 999
    results: dict[int, object] = {}

    def submit(i):
        try:
            results[i] = batcher.submit(jobs[i])
        except ValueError as err:
            results[i] = err

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
        time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(10)
    assert isinstance(results[3], ValueError)  # the bad one fails alone; its batch is retried job by job
    for i in (0, 1, 2, 4):
        out = results[i]
        assert out.last_hidden_state.shape[:2] == jobs[i].inputs["input_ids"].shape  # its own rows and width
        torch.testing.assert_close(out.last_hidden_state[..., 0], jobs[i].inputs["input_ids"].float())
    assert all(rows <= 4 for _, (rows, _) in runs)
    assert any(jobs > 1 for jobs, _ in runs)
    batcher.close(RuntimeError("closed"))


def test_schema_errors_name_the_field():
    from prism_edge.app.serve.api import BadField
    from prism_edge.app.serve.schemas import check_body

    cases = [("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
             ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
             ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
             ("/v1/embeddings", {"input": 5}, "input"),
             ("/v1/forward", {"input_ids": [[1, 2.5]]}, "input_ids[0][1]"),
             ("/v1/generate", {"max_new_tokens": True}, "max_new_tokens"),
             ("/v1/forward", {"budget": "0.1"}, "budget")]
    for route, body, param in cases:
        with pytest.raises(BadField) as err:
            check_body(route, body)
        assert err.value.param == param, (body, err.value.param, str(err.value))
        assert param in str(err.value)
    check_body("/v1/completions", {"model": "m", "prompt": [1, 2], "user": "extra fields pass"})
