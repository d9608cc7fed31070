"""The cluster secret: at the rendezvous every joiner and rank 0 prove, by challenge and response, that they share
it; a process with a wrong or missing one is refused by name on both sides, takes no seat, and the group waits
for the right process.  The protocol runs on a real TCPStore with each rank in a thread; one test starts real
worker processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from conftest import saved_models, text_batch, tiny
from prism_edge import PrismConfig, simulate
from prism_edge.app.cli import build_parser
from prism_edge.app.launch import launch_spec
from prism_edge.cluster import env
from prism_edge.cluster import secret as proto
from prism_edge.cluster.rendezvous import Endpoint, StartupError, take_seat
from prism_edge.cluster.spec import LaunchSpec

WRONG = ("refused by rank 0: wrong cluster secret (--cluster-secret / PRISM_EDGE_CLUSTER_SECRET must match "
         "rank 0's)")


class Rank(threading.Thread):
    """One rank's take_seat in a thread, on its own client of the store (rank 0: the server itself)."""

    def __init__(self, store: dist.TCPStore, rank: int, secret: str | None, world: int = 2, timeout: float = 20):
        super().__init__(daemon=True)
        self.store, self.rank, self.secret, self.world, self.timeout = store, rank, secret, world, timeout
        self.log: list[str] = []
        self.result: dict[int, str] | None = None
        self.error: BaseException | None = None
        self.took = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.result = take_seat(self.store, self.rank, self.world, "127.0.0.1", time.monotonic() + self.timeout,
                                    log=self.log.append, secret=self.secret)
        except BaseException as err:  # noqa: BLE001 - the test reads it
            self.error = err
        self.took = time.monotonic() - t0

    def done(self, timeout: float = 10) -> "Rank":
        self.join(timeout)
        assert not self.is_alive(), f"rank {self.rank} still waiting"
        return self


@pytest.fixture
def stores():
    """The rendezvous store (rank 0's) and a factory of clients, as a joiner on another machine would have."""
    server = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=20), wait_for_workers=False)

    def client() -> dist.TCPStore:
        return dist.TCPStore("127.0.0.1", server.port, 2, False, timeout=timedelta(seconds=20))

    yield server, client


def _seats(server: dist.TCPStore) -> dist.PrefixStore:
    return dist.PrefixStore("prism-edge/seat/", server)


def test_the_right_secret_is_accepted_and_never_sent(stores):
    server, client = stores
    r0, r1 = Rank(server, 0, "correct horse"), Rank(client(), 1, "correct horse")
    r0.start(), r1.start()
    assert r0.done().error is None and r1.done().error is None, (r0.error, r1.error)
    assert r0.result == r1.result == {0: "127.0.0.1", 1: "127.0.0.1"}
    assert not any("refused" in line for line in r0.log), r0.log
    seats = _seats(server)
    said = [seats.get(k).decode() for k in ("auth/offer", "auth/ticket/1", "auth/verdict/1", "auth/closed")]
    assert said[0].startswith("hmac-sha256 ") and said[2].startswith("accept ")
    for text in said:  # neither the secret nor a plain hash of it ever reaches the store
        assert "correct horse" not in text and hashlib.sha256(b"correct horse").hexdigest() not in text


@pytest.mark.parametrize("impostor", ["wrong", None])
def test_a_wrong_or_missing_secret_is_refused_by_name_and_the_group_waits_for_the_right_process(stores, impostor):
    server, client = stores
    r0 = Rank(server, 0, "right")
    r0.start()
    bad = Rank(client(), 1, impostor)
    bad.start()
    bad.done()
    assert isinstance(bad.error, StartupError), bad.error
    me = f"rank 1 (pid {os.getpid()} on "
    text = str(bad.error)
    assert text.startswith(me) and "\n" not in text, text
    if impostor:
        assert text.endswith(WRONG), text
    else:
        assert "refused by rank 0: this process has no cluster secret and rank 0 requires one" in text, text
    assert bad.took < 2.0, f"refused after {bad.took:.2f} s"  # at once, not at the start-up deadline
    why = "wrong cluster secret" if impostor else "it has no cluster secret"
    assert any(line.startswith("warning: rank 0 refused " + me) and why in line for line in r0.log), r0.log
    assert r0.is_alive() and not _seats(server).check(["rank/1"])  # no seat taken: rank 0 still waits
    good = Rank(client(), 1, "right")
    good.start()
    assert good.done().error is None and r0.done().error is None, (good.error, r0.error)
    assert r0.result == {0: "127.0.0.1", 1: "127.0.0.1"}


def test_no_secret_on_either_side_is_todays_rendezvous(stores):
    server, client = stores
    r0, r1 = Rank(server, 0, None), Rank(client(), 1, "")  # empty: no secret
    r0.start(), r1.start()
    assert r0.done().error is None and r1.done().error is None, (r0.error, r1.error)
    assert _seats(server).get("auth/offer") == b"none" and not _seats(server).check(["auth/ticket/1"])


def test_a_joiner_with_a_secret_is_refused_by_a_rank_0_without_one(stores):
    server, client = stores
    r0 = Rank(server, 0, None)
    r0.start()
    bad = Rank(client(), 1, "mine")
    bad.start()
    assert isinstance(bad.done().error, StartupError)
    assert "rank 0 has none" in str(bad.error) and str(bad.error).startswith("rank 1 (pid "), bad.error
    good = Rank(client(), 1, None)
    good.start()
    assert good.done().error is None and r0.done().error is None, (good.error, r0.error)
    assert any("rank 0 has none" in line for line in r0.log), r0.log  # named there too


def test_a_process_arriving_after_the_group_is_complete_is_refused_not_left_waiting(stores):
    server, client = stores
    r0, r1 = Rank(server, 0, "s"), Rank(client(), 1, "s")
    r0.start(), r1.start()
    assert r0.done().error is None and r1.done().error is None
    late = Rank(client(), 1, "s")
    late.start()
    assert isinstance(late.done().error, StartupError) and "admits no more processes" in str(late.error)


def test_the_protocol_binds_the_ticket_and_proves_rank_0_too():
    offered, challenge = proto.offer("k")
    assert challenge and proto.challenge_of(offered) == challenge and proto.offer("k")[1] != challenge
    assert proto.offer(None) == ("none", None) and proto.challenge_of("none") is None
    sent = proto.ticket("k", challenge, 1, 7, "pid 1 on a")
    verdict, refused = proto.judge("k", challenge, 7, json.dumps(sent))
    assert refused is None and proto.check_verdict("k", challenge, sent, 7, verdict) is None
    # the same answer replayed under another ticket, for another rank or another challenge: refused
    for number, ch, rank in ((8, challenge, 1), (7, challenge, 2), (7, proto.offer("k")[1], 1)):
        doc = json.dumps({**sent, "rank": rank})
        assert proto.judge("k", ch, number, doc)[1] is not None
    # a "rank 0" that does not hold the secret cannot forge the acceptance
    forged = proto.judge("other", challenge, 7, json.dumps(proto.ticket("other", challenge, 1, 7, "x")))
    assert "does not prove" in (proto.check_verdict("k", challenge, sent, 7, forged[0]) or "")
    assert proto.judge("k", challenge, 7, "{not json")[0] == "refuse malformed ticket"


def test_the_secret_comes_from_the_flag_a_file_or_the_environment_and_stays_off_command_lines(tmp_path):
    parser = build_parser()
    path = tmp_path / "secret"
    path.write_text("from-file\nsecond line ignored\n")
    assert env.cluster_secret("flag", None, {env.SECRET_ENV: "env"}) == "flag"
    assert env.cluster_secret(None, str(path), {env.SECRET_ENV: "env"}) == "from-file"
    assert env.cluster_secret(None, None, {env.SECRET_ENV: "env"}) == "env"
    assert env.cluster_secret(None, None, {env.SECRET_ENV: ""}) is None
    with pytest.raises(ValueError, match="not both"):
        env.cluster_secret("flag", str(path), {})
    with pytest.raises(ValueError, match="cannot read"):
        env.cluster_secret(None, str(tmp_path / "absent"), {})
    for command in ("launch", "worker", "plan"):
        args = parser.parse_args([command, "--cluster-secret-file", str(path)])
        assert launch_spec(args).cluster_secret == "from-file"
        assert launch_spec(parser.parse_args([command, "--cluster-secret", "s3"])).cluster_secret == "s3"
    spec = LaunchSpec(cluster_secret="s3cr3t")
    assert "s3cr3t" not in repr(spec) and LaunchSpec(cluster_secret="").cluster_secret is None
    cmd = spec.worker_command(PrismConfig(devices=2), 1, 2, "127.0.0.1:1")
    assert "s3cr3t" not in " ".join(cmd) and spec.worker_env() == {env.SECRET_ENV: "s3cr3t"}
    assert LaunchSpec().worker_env() == {env.SECRET_ENV: ""}  # rank 0 without one: its workers without one too


# ------------------------------------------------------------------------------------ real processes
def _worker(rank: int, port: int, model: str, secret_env: str | None, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prism_edge.worker", "--rank", str(rank), "--world-size", "2",
           "--master", f"127.0.0.1:{port}", "--model", model, "--startup-timeout", "60", "--devices", "2",
           "--cr", "4", "--plan", "fixed", "--max-length", "32", *flags]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", env.SECRET_ENV: secret_env or ""}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)


@pytest.mark.slow
def test_an_impostor_worker_is_refused_and_the_cluster_forms_with_the_right_one(tmp_path, one_thread):
    from prism_edge.cluster import Cluster
    from test_faults import _free_port

    model = saved_models(tmp_path, ["bert"])["bert"]
    port, log, box = _free_port(), [], {}
    cfg = PrismConfig(devices=2, cr=4)

    def rank0() -> None:
        try:
            box["cluster"] = Cluster(model, cfg, spawn=False, endpoint=Endpoint("127.0.0.1", port, bind="127.0.0.1"),
                                     startup_timeout=60, cluster_secret="right one", log=log.append)
        except BaseException as err:  # noqa: BLE001 - the test reads it
            box["error"] = err

    first = threading.Thread(target=rank0, daemon=True)
    first.start()
    impostor = _worker(1, port, model, None, "--cluster-secret", "guess")
    _, err = impostor.communicate(timeout=120)
    assert impostor.returncode == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"prism-edge: error: rank 1 (pid {impostor.pid} on ") and line.endswith(WRONG), err[-2000:]
    assert "Traceback" not in err
    assert any(f"rank 0 refused rank 1 (pid {impostor.pid} on " in m for m in log), log
    assert first.is_alive()  # still waiting for its rank 1
    right = _worker(1, port, model, "right one")
    try:
        first.join(120)
        assert "cluster" in box, (box.get("error"), right.poll(), log)
        with box["cluster"] as cluster:
            ids, mask = text_batch(batch=2, length=11, pad_to=[11, 7])
            out = cluster(input_ids=ids, attention_mask=mask)
            ref = simulate(tiny("bert"), cluster.cfg, input_ids=ids, attention_mask=mask, count_flops=False)
            assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < 1e-4
        assert right.wait(60) == 0, right.communicate()[1][-2000:]
    finally:
        if right.poll() is None:
            right.kill()
