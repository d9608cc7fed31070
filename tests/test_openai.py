"""The OpenAI-compatible endpoints, driven by the official `openai` client against running device processes.

One SmolLM2 cluster (2 devices) serves the chat and completion tests, one MiniLM cluster the embedding
tests; each is started once for the module.  References: `prism-edge generate` (the simulator) for the
tokens, `simulate` for the embeddings.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from prism_edge import PrismConfig, simulate

openai = pytest.importorskip("openai")

CFG = PrismConfig(devices=2, cr=4)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This process is rank 0: one torch thread, like every worker (a Cluster leaves threads to its caller)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def _serve(model: str):
    from prism_edge.cluster import Cluster
    from prism_edge.cluster.env import cache_dir
    from serving import serving

    with Cluster(model, CFG, timeout=60, cache_dir=str(cache_dir())) as cluster, serving(cluster) as base:
        yield cluster, base, openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def chat(smollm2):
    with _serve("smollm2") as served:
        yield served


@pytest.fixture(scope="module")
def embed(minilm):
    with _serve("minilm") as served:
        yield served


def _cli_generate(capsys, *argv: str) -> str:
    """What `prism-edge generate ... --quiet-prompt` prints: the generated text (the simulator)."""
    from prism_edge.app.cli import main

    capsys.readouterr()
    assert main(["generate", *argv, "--quiet-prompt", "--devices", "2", "--cr", "4", "--decode", "local"]) == 0
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.real
def test_streamed_chat_equals_prism_edge_generate(chat, capsys):
    cluster, _, client = chat
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == _cli_generate(capsys, QUESTION, "--chat", "--max-new-tokens", "16")
    assert "Paris" in text and finish == ["stop"]  # SmolLM2 answers, then its EOS stops it
    usage = chunks[-1].usage
    assert usage.completion_tokens > 3 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert cluster.alive


@pytest.mark.real
def test_seeded_sampling_equals_the_simulator(chat, capsys):
    _, _, client = chat
    reply = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0.8,
                                      top_p=0.9, seed=3)
    want = _cli_generate(capsys, "Once upon a time", "--max-new-tokens", "10", "--sample", "--temperature", "0.8",
                         "--top-p", "0.9", "--seed", "3")
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10
    prism = reply.model_extra["prism"]
    assert prism["devices"] == 2 and prism["cr"] == 4
    assert prism["bytes"]["exchange"] > 0 and prism["bytes"]["decode"] == 10 * 8


@pytest.mark.real
def test_stop_strings_cut_the_text_and_the_generation(chat):
    _, _, client = chat
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0,
                                           stop=["Paris", "never"])
    choice = reply.choices[0]
    assert choice.message.content == "The capital of France is " and choice.finish_reason == "stop"
    assert reply.usage.completion_tokens <= 7  # stopped at "Paris", not at max_tokens
    streamed = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0,
                                              stop="Paris", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content


@pytest.mark.real
def test_requests_queue_and_never_mix(chat):
    """Two clients at once: each gets exactly what it gets alone (the cluster serves one at a time)."""
    _, _, client = chat
    prompts = ["The river burst its banks", "In the morning the market"]
    alone = [client.completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, client.completions.create(
        model="smollm2", prompt=prompts[i], max_tokens=6, temperature=0).choices[0].text)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [together[0], together[1]] == alone
    metrics = urllib.request.urlopen(chat[1] + "/metrics", timeout=30).read().decode()
    value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    assert value["prism_time_to_first_token_seconds_count"] >= 4 and value["prism_prefill_seconds_count"] >= 4
    assert value["prism_time_per_output_token_seconds_count"] >= 4 * 5  # 6 tokens: 5 gaps each
    assert value['prism_tokens_total{kind="completion"}'] >= 24
    assert value['prism_requests_total{route="/v1/completions",status="200"}'] >= 4


@pytest.mark.real
def test_errors_come_in_openai_shape(chat):
    cluster, base, client = chat
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert err.value.body["param"] == "temperature" and "at most 2" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=10_000)
    assert "positions" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="smollm2", input="hi")
    assert err.value.body["param"] == "model"
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing", 404)):
        req = urllib.request.Request(base + path, b"{}" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=30)
        assert http_err.value.code == status and set(json.load(http_err.value)["error"]) == {
            "message", "type", "param", "code"}
    conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(1 << 30))  # announced, never sent: refused before reading
    conn.endheaders()
    assert conn.getresponse().status == 413
    assert cluster.alive


@pytest.mark.real
def test_embeddings_equal_simulate(embed, minilm):
    from prism_edge.app.serve.embeddings import Pooling, model_folder

    cluster, _, client = embed
    texts = ["The river burst its banks after three days of rain.", "Stocks fell sharply.", "A cat sat."]
    assert Pooling.of(model_folder(cluster)) == Pooling(("mean_tokens",), 256)  # MiniLM's 1_Pooling/config.json
    enc = minilm.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = simulate(minilm.model, cluster.cfg, **enc, count_flops=False).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, N, 1)
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    for fmt in ("base64", "float"):  # the client asks for base64 unless told
        reply = client.embeddings.create(model="minilm", input=texts, **({"encoding_format": fmt} if fmt == "float"
                                                                          else {}))
        got = torch.tensor([d.embedding for d in reply.data])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert reply.usage.prompt_tokens == int(enc["attention_mask"].sum())
    one = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), want[0], atol=1e-5, rtol=1e-5)
    assert one.model_extra["prism"]["pooling"] == ["mean_tokens"]
    assert one.model_extra["prism"]["budget"] == cluster.cfg.budget  # the server's, unless a request says
    # a request's own budget (an extension, sent as the official client sends extra fields) on a longer text
    long = " ".join(texts * 6)
    enc = minilm.tokenizer([long], return_tensors="pt")
    with torch.inference_mode():
        hidden = simulate(minilm.model, cluster.cfg.with_budget(0.05), **enc, count_flops=False).last_hidden_state
    want = torch.nn.functional.normalize(hidden.mean(1), dim=-1)
    tight = client.embeddings.create(model="minilm", input=long, encoding_format="float", extra_body={"budget": 0.05})
    torch.testing.assert_close(torch.tensor(tight.data[0].embedding), want[0], atol=1e-5, rtol=1e-5)
    default = client.embeddings.create(model="minilm", input=long, encoding_format="float")
    assert tight.model_extra["prism"]["budget"] == 0.05
    assert tight.model_extra["prism"]["bytes"]["exchange"] < default.model_extra["prism"]["bytes"]["exchange"]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="minilm", input=long, extra_body={"budget": 2})
    assert err.value.body["param"] == "budget"
