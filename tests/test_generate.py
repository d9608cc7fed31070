"""Generation: distributed prefill, KV-cache decode on the last device, sampling."""

import pytest
import torch

from conftest import DECODERS, text_batch, tiny
from prism_edge import PrismConfig, simulate
from prism_edge.config import PLAIN
from prism_edge.partition.plan import split_sizes
from prism_edge.runtime.generate import Sampling, generate


def _hf_greedy(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()


@pytest.mark.fast_cases(name="llama-lm")
@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("cfg", [PrismConfig(devices=3, cr=1), PrismConfig(devices=2, scheme="voltage"),
                                 PrismConfig(devices=1, scheme="full")], ids=["cr1", "voltage", "full"])
def test_exact_schemes_generate_what_hf_generates(name, cfg):
    model = tiny(name)
    ids, _ = text_batch(batch=1, length=11)
    assert generate(model, cfg, ids, max_new_tokens=12).new_ids == _hf_greedy(model, ids, 12)


@pytest.mark.fast_cases(cr=4)
@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("cr", [2, 4])
def test_kv_cache_decode_equals_rerunning_the_grown_sequence(name, cr):
    """Decoding = the PRISM forward over prompt + new tokens with the prompt's slices, new tokens on the last device."""
    model = tiny(name)
    ids, _ = text_batch(batch=1, length=13)
    cfg = PrismConfig(devices=3, cr=cr, window=1)
    steps = 7
    gen = generate(model, cfg, ids, max_new_tokens=steps, keep_logits=True, decode="local")
    sizes = list(split_sizes(13, 3))
    sizes[-1] += steps - 1  # the last new token is sampled but never fed back
    rerun = simulate(model, cfg, input_ids=gen.ids[:, :-1], sizes=tuple(sizes), count_flops=False)
    torch.testing.assert_close(torch.stack(gen.logits), rerun.logits[0, 12:].detach(), atol=1e-5, rtol=1e-5)
    assert gen.prefill_stats.total_bytes > 0 and gen.decode_bytes_per_token == 8


@pytest.mark.parametrize("name", DECODERS)
def test_handoff_and_distributed_decode_agree_and_count_their_bytes(name):
    """Both give the new tokens exact attention over the K/V every device computed at prefill."""
    model = tiny(name)
    ids, _ = text_batch(batch=1, length=20)
    cfg = PrismConfig(devices=3, cr=4, **{**PLAIN, "window": 1, "anchor": 2})  # float32 wire: lossless handoff
    runs = {m: generate(model, cfg, ids, max_new_tokens=10, keep_logits=True, decode=m)
            for m in ("local", "handoff", "distributed")}
    hand, dist = runs["handoff"], runs["distributed"]
    assert hand.new_ids == dist.new_ids
    torch.testing.assert_close(torch.stack(hand.logits), torch.stack(dist.logits), atol=1e-5, rtol=1e-5)
    assert (torch.stack(hand.logits) - torch.stack(runs["local"].logits)).abs().max() > 1e-4  # it matters
    g = model.config
    kv = 2 * 2 * 16  # K and V of 2 KV heads of 16 (tiny llama); GPT-2: 4 heads of 16
    width = kv if name.startswith("llama") else 2 * g.n_embd
    layers = g.num_hidden_layers
    # handoff: every earlier position but the last device's two recomputed anchors, every layer, float32
    assert hand.handoff_bytes == layers * (sum(split_sizes(20, 3)[:2]) - 2) * width * 4 and hand.decode_bytes == 0
    heads = g.num_attention_heads
    # distributed: per token and layer, a query to each earlier device and (output, log-sum-exp) back
    per_token = layers * 2 * (heads * 16 + heads * 16 + heads) * 4
    assert dist.decode_bytes == per_token * (len(dist.new_ids) - 1) and dist.handoff_bytes == 0


def test_an_exact_tail_makes_every_decode_mode_the_same():
    model = tiny("llama-lm")
    ids, _ = text_batch(batch=1, length=20)
    cfg = PrismConfig(devices=3, cr=4, **{**PLAIN, "tail": 4})
    runs = [generate(model, cfg, ids, max_new_tokens=8, keep_logits=True, decode=m)
            for m in ("local", "handoff", "distributed", "auto")]
    for run in runs[1:]:
        assert run.new_ids == runs[0].new_ids
        torch.testing.assert_close(torch.stack(run.logits), torch.stack(runs[0].logits), atol=1e-5, rtol=1e-5)
    assert runs[3].mode == "local"  # auto: the prefill already gave the last device everything exactly


def test_auto_decode_weighs_handoff_against_round_trips():
    from prism_edge.runtime.decode import Link

    model = tiny("llama-lm")
    ids, _ = text_batch(batch=1, length=30)
    cfg = PrismConfig(devices=3, cr=4, **PLAIN)
    slow_far = generate(model, cfg, ids, max_new_tokens=4, decode="auto", link=Link(mbit=1000, ms=50))
    assert slow_far.mode == "handoff"  # round trips are dear: send the K/V once
    thin_near = generate(model, cfg, ids, max_new_tokens=1, decode="auto", link=Link(mbit=0.01, ms=0.001))
    assert thin_near.mode == "distributed"  # bandwidth is dear and only one token is wanted
    short = generate(model, PrismConfig(devices=3, cr=4), ids, max_new_tokens=1, decode="auto")
    assert short.mode == "local"  # the defaults sent a 30-token prompt exactly: nothing to hand off
    with pytest.raises(ValueError, match="unknown decode mode"):
        generate(model, cfg, ids, max_new_tokens=1, decode="remote")


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny("llama-lm")
    ids, _ = text_batch(batch=1, length=9)
    cfg = PrismConfig(devices=2, cr=2)
    s = Sampling(do_sample=True, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    a = generate(model, cfg, ids, max_new_tokens=8, sampling=s, keep_logits=True)
    b = generate(model, cfg, ids, max_new_tokens=8, sampling=s)
    assert a.new_ids == b.new_ids
    for logits, tid in zip(a.logits, a.new_ids):
        assert tid in logits.topk(5).indices.tolist()
    stop = a.new_ids[2]
    c = generate(model, cfg, ids, max_new_tokens=8, sampling=s, stop_ids=(stop,))
    assert c.new_ids[-1] == stop and c.stopped_by == "stop token" and len(c.new_ids) <= 3


def test_generate_refuses_bad_input():
    with pytest.raises(ValueError, match="causal LM"):
        generate(tiny("bert"), PrismConfig(devices=2), torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="one prompt"):
        generate(tiny("gpt2-lm"), PrismConfig(devices=2), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        generate(tiny("gpt2-lm"), PrismConfig(devices=2), torch.ones(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(do_sample=True, temperature=0)


@pytest.mark.real
def test_smollm2_greedy_matches_hf_at_cr1(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok("The river burst its banks after three days of rain, and", return_tensors="pt")["input_ids"]
    want = _hf_greedy(model, ids, 32)
    assert generate(model, PrismConfig(devices=3, cr=1), ids, max_new_tokens=32).new_ids == want


@pytest.mark.real
def test_generate_cli_streams_and_stops(smollm2):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "prism_edge", "generate", "What is the capital of France?", "--chat",
                           "--cr", "4", "--max-new-tokens", "16", "--quiet-prompt"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "tokens/s" in proc.stderr and "8 B per token" in proc.stderr


@pytest.mark.real
def test_generate_cli_on_device_processes(smollm2):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "prism_edge", "generate", "What is the capital of France?", "--chat",
                           "--cr", "4", "--devices", "2", "--max-new-tokens", "12", "--quiet-prompt", "--launch"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_decoders_score_at_a_budget_and_generate_from_every_earlier_row():
    """The decoder defaults: a forward (scoring) spends `budget`, while a generation's prefill spends
    `generate_budget`, 1.0: every earlier position whole, as the fixed-count defaults sent it (an exact view:
    decoding is local), at the same bytes; a generation asked for a budget spends it and hands off what the
    prefill left."""
    model = tiny("llama-lm")
    ids, _ = text_batch(batch=1, length=60)
    run = PrismConfig().resolve("decoder")
    assert run.budget == 0.1 and run.generate_budget == 1.0
    cfg = PrismConfig(devices=4, cr=16, wire_dtype="int8", budget=0.15, generate_budget=1.0)
    scored = simulate(model, cfg, input_ids=ids, count_flops=False).stats.total_bytes
    volt = simulate(model, PrismConfig(devices=4, scheme="voltage"), input_ids=ids, count_flops=False).stats.total_bytes
    assert scored <= 0.15 * volt * 1.001
    gen = generate(model, cfg, ids, max_new_tokens=2)
    fixed = generate(model, PrismConfig(devices=4, cr=16, wire_dtype="int8", budget=0.0), ids, max_new_tokens=2)
    assert gen.mode == fixed.mode == "local" and gen.new_ids == fixed.new_ids
    assert gen.prefill_stats.total_bytes == fixed.prefill_stats.total_bytes > scored
    tight = generate(model, cfg.replace(generate_budget=0.15), ids, max_new_tokens=2, decode="auto")
    assert tight.prefill_stats.total_bytes == scored and tight.mode != "local"
