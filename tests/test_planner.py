"""The planner (issue 22): probes, the cost model's bytes against the ledger, the choice, and requests that run on
a subset of the devices against the simulator and the unpartitioned model."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import saved_models, text_batch, tiny
from prism_edge import PrismConfig, simulate
from prism_edge.cluster import Cluster
from prism_edge.cluster.probes import PROBE_MORE, PROBE_ROUNDS, ProbeSize, fit, measure, rounds
from prism_edge.models import adapter_for
from prism_edge.partition.stages import StageLayout
from prism_edge.planning import (Candidate, DeviceProfile, Drift, LinkProfile, ModelCost, Planner, Profile,
                                 candidate_config, check_fidelity, estimate, speed_weights)
from prism_edge.planning.planner import balanced_budget
from prism_edge.runtime import wire

pytestmark = pytest.mark.usefixtures("one_thread")


def _profile(world: int, *, ms: float = 0.1, mbit: float = 10_000.0, gflops: float = 50.0, hosts: int | None = None,
             cores: int = 4, layer_ms: float = 0.2) -> Profile:
    hosts = world if hosts is None else hosts
    devices = tuple(DeviceProfile(p, f"h{p % hosts}", cores, 1, gflops * 1e9, layer_ms / 1e3, 4096.0)
                    for p in range(world))
    links = tuple(LinkProfile(p, q, ms / 1e3, mbit) for p in range(world) for q in range(p + 1, world))
    return Profile(devices, links)


def _planner(name: str, world: int, profile: Profile, **cfg) -> tuple[Planner, object]:
    model = tiny(name, layers=4)
    adapter = adapter_for(model)
    run = PrismConfig(devices=world, **cfg).resolve(adapter.kind)
    return Planner(run, ModelCost.of(adapter), profile, StageLayout.single(world, 4)), adapter


# ------------------------------------------------------------------------------------------- plain data
def test_profile_checks_and_round_trips():
    prof = _profile(3, hosts=1, cores=2)
    assert Profile.from_dict(prof.to_dict()) == prof
    assert prof.link(2, 0).latency_s == pytest.approx(1e-4)
    assert prof.contention([0, 1, 2]) == [1.5, 1.5, 1.5]  # 3 threads on 2 cores
    assert prof.contention([0, 1]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="every pair"):
        Profile(prof.devices, prof.links[:1])
    with pytest.raises(ValueError, match="flops_per_s"):
        DeviceProfile(0, "h", 1, 1, 0.0, 0.0, 1.0)
    assert len(prof.describe()) == 3 + 3


def test_probe_helpers():
    pairs = [p for r in rounds(5) for p in r]
    assert sorted(pairs) == [(p, q) for p in range(5) for q in range(p + 1, 5)]
    assert all(len({x for pair in r for x in pair}) == 2 * len(r) for r in rounds(4))  # one partner per round
    speed, intercept = fit([(1e9, 0.011), (4e9, 0.041)])
    assert speed == pytest.approx(1e11) and intercept == pytest.approx(0.001)
    assert fit([(1e9, 0.05), (4e9, 0.04)]) == (pytest.approx(1e11), 0.0)  # noise: all speed


class _Timed(ProbeSize):
    """A probe size whose runs take the given seconds per layer (2 layers a run), in turn; 1 ms of real time each."""

    def __init__(self, flops: float, seconds: list[float]) -> None:
        self.flops, self.seconds, self.times, self.runs = flops, iter(seconds), [], 0

    def run(self, keep: bool = True) -> None:
        t = next(self.seconds)
        time.sleep(0.001)
        self.runs += 1
        if keep:
            self.times += [t, t * 1.02]


def test_the_compute_probe_reads_through_a_burst_of_load():
    """1 GFLOP at 11 ms and 4 GFLOPs at 41 ms a layer (100 GFLOP/s, 1 ms intercept): a load that triples the
    first rounds of the small size (alone, it would make the device look 3x faster) leaves the fit where it is;
    a load all along is the device's speed; times that never settle stop within PROBE_MORE of the rounds."""
    quiet = [0.011] * 10, [0.041] * 10
    burst = [0.011, 0.033, 0.033] + [0.011] * 7, [0.041] * 10  # warm-up, then two loaded small runs
    for small, large in (quiet, burst):
        speed, intercept = fit([(f, t) for t, f in measure([_Timed(1e9, small), _Timed(4e9, large)])])
        assert speed == pytest.approx(1e11, rel=0.03) and intercept == pytest.approx(0.001, rel=0.1)
    slow = [_Timed(1e9, [0.0165] * 10), _Timed(4e9, [0.0615] * 10)]  # 1.5x slower throughout
    assert fit([(f, t) for t, f in measure(slow)])[0] == pytest.approx(1e11 / 1.5, rel=0.03)
    assert all(s.runs == 1 + PROBE_ROUNDS for s in slow)  # trusted at once: no round more than before
    shaky = [_Timed(1e9, [0.011 * (1 + (i % 3)) for i in range(1000)]), _Timed(4e9, [0.041, 0.01] * 500)]
    t0 = time.perf_counter()
    measure(shaky)  # never plausible (the large size looks faster than the small one)
    first = (1 + PROBE_ROUNDS) * 2 * 0.001
    assert time.perf_counter() - t0 < (1 + PROBE_MORE) * first * 3 + 0.05


def test_fidelity_and_weights():
    assert check_fidelity("balanced") == "balanced" and check_fidelity("0.1") == 0.1
    for bad in ("fast", 0, 1.5, True):
        with pytest.raises(ValueError, match="fidelity must be one of exact, high, balanced"):
            check_fidelity(bad)
    prof = _profile(3)
    assert speed_weights(prof) is None
    fast = Profile((*prof.devices[:2], DeviceProfile(2, "x", 4, 1, 150e9, 0.0, 1.0)), prof.links)
    assert speed_weights(fast) == (1.0, 1.0, 3.0)


def test_candidate_configs():
    run = PrismConfig(devices=4, cr=8, weights=(1, 2, 3, 4)).resolve("encoder")
    one = candidate_config(run, Candidate(1, "full"))
    assert one.scheme == "full" and one.effective_devices == 1
    two = candidate_config(run, Candidate(2))
    assert two.devices == 2 and two.weights == (1, 2) and two.cr == 8 and two.budget == run.budget
    volt = candidate_config(run, Candidate(3, "voltage"))
    assert volt.scheme == "voltage" and volt.wire_dtype == "float32" and volt.effective_cr == 1
    assert candidate_config(run, Candidate(4, "prism", 0.05)).budget == 0.05
    header = wire.Header(wire.FORWARD, 7, 1, 5, devices=2, scheme="voltage", budget_ppm=100_000)
    assert wire.Header.decode(header.encode()) == header


def test_balanced_budget_reads_the_frontiers():
    enc = PrismConfig(devices=4).resolve("encoder")
    got = balanced_budget(enc, 300)
    assert got is not None and got < enc.budget  # a cheaper budget still predicted >= 0.99 cosine
    assert balanced_budget(PrismConfig(devices=4, budget=0.05).resolve("encoder"), 300) is None


# ------------------------------------------------------------------------------------------- cost model
@pytest.mark.parametrize("name, cfg", [("bert", dict(cr=4)), ("llama-lm", dict(cr=4)), ("bert", dict(scheme="voltage")),
                                       ("gpt2-lm", dict(cr=2, budget=0.3))])
def test_predicted_bytes_are_the_ledgers(name, cfg):
    """The cost model's exchange bytes are exactly what the simulator counts, padded batches included."""
    ids, mask = text_batch(batch=3, length=40, pad_to=[40, 31, 22])
    for k in (2, 3):
        planner, adapter = _planner(name, 3, _profile(3), **cfg)
        cand = Candidate(k, cfg.get("scheme", "prism"))
        batch = adapter.prepare(input_ids=ids, attention_mask=mask)
        est = planner.weigh(batch, cand, "all")
        ref = simulate(adapter.model, planner.config_for(cand), input_ids=ids, attention_mask=mask)
        assert est.exchange_bytes == ref.stats.total_bytes > 0


def test_the_cost_model_follows_the_links_and_lengths():
    ids = torch.randint(3, 90, (1, 60))
    fast, _ = _planner("bert", 4, _profile(4, gflops=0.05))  # slow compute, fast links: spread out
    batch = fast.cost  # noqa: F841 - the model's costs are shared below
    adapter = adapter_for(tiny("bert", layers=4))
    b = adapter.prepare(input_ids=ids)
    assert fast.choose(b, "mean").candidate.devices == 4
    slow, _ = _planner("bert", 4, _profile(4, gflops=0.05, ms=50.0, mbit=1.0))  # slow links: stay on one device
    choice = slow.choose(b, "mean")
    assert choice.candidate.devices == 1
    assert set(c.devices for c, _ in choice.considered) >= {1}
    short = adapter.prepare(input_ids=ids[:, :3])
    assert fast.choose(short, "mean").candidate.devices <= 3  # every device needs a position
    est = estimate(b, fast.config_for(Candidate(2)), fast.cost, fast.profile, StageLayout.single(2, 4), "mean")
    assert est.seconds == pytest.approx(est.compute_s + est.exchange_s + est.fixed_s)


def test_shared_cores_make_more_devices_slower():
    adapter = adapter_for(tiny("bert", layers=4))
    b = adapter.prepare(input_ids=torch.randint(3, 90, (1, 60)))
    alone, _ = _planner("bert", 4, _profile(4, gflops=0.05))
    shared, _ = _planner("bert", 4, _profile(4, gflops=0.05, hosts=1, cores=1))
    a = alone.weigh(b, Candidate(4), "mean").compute_s
    s = shared.weigh(b, Candidate(4), "mean").compute_s
    assert s == pytest.approx(4 * a, rel=1e-6)


def test_exact_fidelity_plans_voltage_and_stages_keep_their_layout():
    planner, adapter = _planner("bert", 3, _profile(3))
    assert [c.scheme for c in planner.candidates("exact", 50)] == ["full", "voltage", "voltage"]
    assert [c.budget for c in planner.candidates(0.07, 50)] == [None, 0.07, 0.07]
    staged = Planner(planner.cfg.replace(stages=3), planner.cost, planner.profile, StageLayout.single(3, 4))
    assert len(staged.candidates("high", 50)) == 3  # single layout passed: not staged
    layout = StageLayout.single(3, 4)
    from prism_edge.partition.stages import Stage
    layout = StageLayout((Stage(0, 0, 1, 0, 2), Stage(1, 1, 2, 2, 4)))
    staged = Planner(planner.cfg, planner.cost, planner.profile, layout)
    assert [c.devices for c in staged.candidates("high", 50)] == [3]
    b = adapter.prepare(input_ids=torch.randint(3, 90, (1, 30)))
    assert staged.weigh(b, Candidate(3), "mean").exchange_s > 0  # the hand-offs


def test_memory_rules_out_what_does_not_fit():
    import dataclasses

    adapter = adapter_for(tiny("bert", layers=4))
    b = adapter.prepare(input_ids=torch.randint(3, 90, (4, 60)))
    roomy, _ = _planner("bert", 2, _profile(2))  # two hosts, 4 GiB free each
    one, two = roomy.weigh(b, Candidate(1, "full"), "all"), roomy.weigh(b, Candidate(2), "all")
    assert one.fits and two.fits and 0 < two.peak_bytes < one.peak_bytes
    assert roomy.choose(b, "all").candidate.devices == 1  # fast compute: one device wins while it fits

    def planner(free_mib: float) -> Planner:
        devices = tuple(dataclasses.replace(d, free_mib=free_mib) for d in roomy.profile.devices)
        return Planner(roomy.cfg, roomy.cost, Profile(devices, roomy.profile.links), roomy.layout)

    between = (one.peak_bytes + two.peak_bytes) / 2 / 0.8 / 2**20  # one device cannot hold it, each of two can
    choice = planner(between).choose(b, "all")
    assert choice.candidate.devices == 2 and not dict(choice.considered)[Candidate(1, "full")].fits
    with pytest.raises(ValueError, match="no plan fits this request in memory"):
        planner(1e-4).choose(b, "all")


def test_drift():
    d = Drift(window=2, factor=2.0, slack_s=0.0)
    d.observe(0.01, 0.011)
    assert not d.drifted
    d.observe(0.01, 0.05)
    d.observe(0.01, 0.05)
    assert d.drifted
    d.reset()
    d.observe(0.1, 0.04)  # far under the prediction counts too
    d.observe(0.1, 0.06)  # ... but one request within the band breaks the run
    assert not d.drifted


# ------------------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("models"), ["bert", "llama-lm"])


def test_a_request_on_fewer_devices_equals_the_simulator(saved):
    """plan auto: probes at start-up; a request on ranks 0..k-1 equals the simulator's k-device split, byte for
    byte, while the others sit out; the reply names the plan and its predicted and measured time."""
    ids, mask = text_batch(batch=2, length=20, pad_to=[20, 14])
    cfg = PrismConfig(devices=3, cr=4)
    model = tiny("bert")
    with Cluster(saved["bert"], cfg, timeout=20, plan="auto") as cluster:
        prof = cluster.profile
        assert prof is not None and prof.world == 3 and len(prof.links) == 3
        assert all(d.flops_per_s > 0 for d in prof.devices) and prof.probe_s < 10
        assert cluster.describe()["profile"]["devices"][2]["rank"] == 2
        for k in (1, 2, 3):
            out = cluster(input_ids=ids, attention_mask=mask, plan=Candidate(k, "full" if k == 1 else "prism"))
            ref = simulate(model, cluster.planner.config_for(Candidate(k)), input_ids=ids, attention_mask=mask)
            assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < 1e-5
            assert out.stats.world == k and out.stats.total_bytes == ref.stats.total_bytes
            assert out.planned["devices"] == k
        for _ in range(2):  # planned, then the same shape again (the choice and its plans remembered)
            auto = cluster(input_ids=ids, attention_mask=mask, plan="auto")
            assert auto.planned["predicted_ms"] > 0 and auto.planned["measured_ms"] > 0
            assert auto.planned["plan"] in auto.planned["candidates"]
            k = auto.planned["devices"]
            ref = simulate(model, cluster.planner.config_for(Candidate(k, "full" if k == 1 else "prism")),
                           input_ids=ids, attention_mask=mask)
            assert (auto.last_hidden_state - ref.last_hidden_state).abs().max() < 1e-5
        exact = cluster(input_ids=ids, attention_mask=mask, plan=Candidate(3, "voltage"))
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert ((exact.last_hidden_state - full) * mask[..., None]).abs().max() < 1e-4
        with pytest.raises(ValueError, match="plan devices must be 1..3"):
            cluster(input_ids=ids, attention_mask=mask, plan=Candidate(4))
        cluster.reprobe()  # between requests, every device again
        assert cluster(input_ids=ids, attention_mask=mask, plan=Candidate(2)).stats.world == 2
        before = cluster.profile
        cluster._beat()  # the heartbeat re-probes only once the exchanges drifted (and not too often)
        assert cluster.profile is before
        cluster.coordinator.drift.run, cluster.replanner.probed = 99, time.monotonic() - 3600
        cluster._beat()
        assert cluster.profile is not before and not cluster.coordinator.drift.drifted
        assert cluster(input_ids=ids, attention_mask=mask, plan="auto").stats.world >= 1


def test_fixed_clusters_do_not_plan(saved):
    ids, mask = text_batch(batch=1, length=12)
    with Cluster(saved["bert"], PrismConfig(devices=2, cr=4), timeout=20) as cluster:
        assert cluster.profile is None
        out = cluster(input_ids=ids, attention_mask=mask)
        assert out.planned["plan"] == "fixed" and out.planned["devices"] == 2
        with pytest.raises(ValueError, match="plan 'auto' needs the start-up probes"):
            cluster(input_ids=ids, attention_mask=mask, plan="auto")
        with pytest.raises(ValueError, match="start the cluster with --plan auto"):
            cluster(input_ids=ids, attention_mask=mask, fidelity="exact")  # never silently inexact
        assert cluster(input_ids=ids, attention_mask=mask, plan=Candidate(1, "full")).stats.world == 1


@pytest.mark.slow
def test_generation_on_fewer_devices(saved):
    """A generation's prefill on 1 or 2 of 3 devices gives the full model's greedy tokens."""
    model = tiny("llama-lm")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    with Cluster(saved["llama-lm"], PrismConfig(devices=3, cr=1), timeout=20, plan="auto") as cluster:
        for k in (1, 2):
            gen = cluster.generate(ids, max_new_tokens=6, plan=Candidate(k, "full" if k == 1 else "prism"))
            assert gen.new_ids == ref and gen.planned["devices"] == k
        auto = cluster.generate(ids, max_new_tokens=6, plan="auto")
        assert auto.new_ids == ref and auto.planned["predicted_ms"] > 0


@pytest.mark.slow
def test_devices_sitting_out_a_long_request_stay_up(tmp_path, monkeypatch):
    """A request on rank 0 alone that lasts longer than the timeout: rank 0 pings the others from its layer loop,
    so they are still there for the next request on every device."""
    import prism_edge.cluster.node as node

    path = str(tmp_path / "llama8")
    tiny("llama-lm", layers=8).save_pretrained(path)
    slow_layer = node._layer

    def layer(*args, **kwargs):
        time.sleep(0.35)  # 8 layers: 2.8 s on rank 0, past the 2 s timeout
        return slow_layer(*args, **kwargs)

    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(3))
    with Cluster(path, PrismConfig(devices=3, cr=4), timeout=2) as cluster:
        monkeypatch.setattr(node, "_layer", layer)
        t0 = time.monotonic()
        cluster(input_ids=ids, plan=Candidate(1, "full"))
        assert time.monotonic() - t0 > 2.0
        monkeypatch.setattr(node, "_layer", slow_layer)
        assert cluster(input_ids=ids, plan=Candidate(3)).stats.world == 3


# ------------------------------------------------------------------------------------------- the commands
def test_plan_command_shows_the_probes_and_every_candidate(saved, capsys):
    from prism_edge.app.cli import main

    rc = main(["plan", "--model", saved["bert"], "--devices", "2", "--cr", "4", "--lengths", "8", "30", "--measure",
               "1", "--timeout", "20"], hard_exit=False)
    out = capsys.readouterr().out
    assert rc == 0
    assert "device 1:" in out and "link 0-1:" in out and "probes took" in out
    lines = [line for line in out.splitlines() if line.strip().startswith(("8", "30"))]
    assert len(lines) == 4 and sum("*" in line for line in lines) == 2  # 2 candidates per length, one pick each
    assert "beyond the model's" not in out
    assert main(["plan", "--model", saved["bert"], "--devices", "2", "--lengths", "0"], hard_exit=False) != 0


def _bench_rows():
    rows = []
    for link, one, two in (("loopback", 0.010, 0.020), ("wifi", 0.100, 0.050)):
        rows.append({"model": "m", "link": link, "positions": 64, "plan": "1 device", "devices": 1, "wall_s": one,
                     "predicted_s": one * 1.1})
        rows.append({"model": "m", "link": link, "positions": 64, "plan": "2 devices", "devices": 2, "wall_s": two,
                     "predicted_s": two * 0.8})
        pick = "1 device" if one < two else "2 devices"
        rows.append({"model": "m", "link": link, "positions": 64, "plan": "auto", "pick": pick,
                     "devices": 1 if pick == "1 device" else 2, "wall_s": min(one, two) * 1.01,
                     "predicted_s": 0.0})
    rows.append({"model": "m", "link": "wifi", "positions": 2048, "error": "longer than the model takes (512)"})
    return rows


def test_bench_plan_summarises_picks_and_errors(tmp_path):
    from prism_edge.bench import plan as bench

    rows = _bench_rows()
    s = bench.summary(rows)
    assert s["cells"] == 2 and s["candidates"] == 4
    assert s["median_error"] == pytest.approx(0.15) and s["pick_within_10pct"] == 1.0
    assert s["worst_pick_vs_one"] == 1.0 and s["worst_pick_vs_best"] == pytest.approx(1.0)
    text = bench.table(rows, "t")
    assert "| wifi | 64 |" in text and "**50** / 40" in text  # the fastest measured in bold
    assert bench.plot(rows, tmp_path / "p.png", "m").stat().st_size > 0


@pytest.mark.slow
def test_bench_plan_runs_a_group(saved, tmp_path):
    from prism_edge.bench import plan as bench
    from prism_edge.bench.options import PlanOptions

    options = PlanOptions(out=tmp_path, model=saved["bert"], devices=2, lengths=(8, 40), link=("loopback",),
                          repeats=1, default_job=False)
    text = bench.main(options)
    assert "prediction error over 4 measured candidates" in text
    rows = [r for r in __import__("json").loads((tmp_path / f"plan-{saved['bert'].replace('/', '_')}.json")
                                                .read_text())["rows"]]
    autos = [r for r in rows if r["plan"] == "auto"]
    assert len(autos) == 2 and all(r["ran"] == r["pick"] for r in autos) and all(r["planning_s"] > 0 for r in autos)
