"""Emulated edge links: Link/parse_link validation, and (as root) the namespace star, its shaping and teardown.

Timings are checked with wide tolerances (±25 %) because the machine is shared and has two cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from prism_edge.bench.links import PRESETS, EmulatedNetwork, Link, available, cleanup_stale, parse_link

PREFIX = "pt"  # tests' own prefix, so they never touch a real run's namespaces
PY = sys.executable

# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("text,want", [
    ("50mbit", Link(50, 0)), ("50mbit,10ms", Link(50, 10)), (" 2.5MBIT , 0.5ms ", Link(2.5, 0.5)),
    ("wifi", PRESETS["wifi"]), ("LAN", PRESETS["lan"]), ("slow", Link(10, 20)),
])
def test_parse_link(text, want):
    assert parse_link(text) == want


@pytest.mark.parametrize("text", ["", "50", "50mb", "fast", "50mbit,10", "10ms", "-5mbit", "0mbit", "50mbit,ms"])
def test_parse_link_rejects(text):
    with pytest.raises(ValueError):
        parse_link(text)


@pytest.mark.parametrize("kwargs,match", [
    ({"rate_mbit": 0}, "rate_mbit must be > 0"), ({"rate_mbit": -1}, "rate_mbit must be > 0"),
    ({"rate_mbit": 10, "delay_ms": -1}, "delay_ms must be >= 0"), ({"rate_mbit": float("inf")}, "finite"),
    ({"rate_mbit": "10"}, "finite number"), ({"rate_mbit": True}, "finite number"),
])
def test_link_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Link(**kwargs)


def test_network_argument_validation():
    with pytest.raises(ValueError, match="devices"):
        EmulatedNetwork(0, Link(10))
    with pytest.raises(ValueError, match="prefix"):
        EmulatedNetwork(2, Link(10), prefix="Bad-1")
    with pytest.raises(ValueError, match="link must be a Link"):
        EmulatedNetwork(2, "10mbit")  # type: ignore[arg-type]
    net = EmulatedNetwork(3, Link(10), prefix="pq")
    assert net.interface(2) == f"pq{os.getpid()}d2" and len(net.interface(2)) <= 15
    assert net.namespace(1).startswith(f"pq-{os.getpid()}-") and net.namespace(1).endswith("-d1")
    assert net.wrap(1, ["true"]) == ["ip", "netns", "exec", net.namespace(1), "true"]
    with pytest.raises(ValueError, match="device index"):
        net.address(3)


# ---------------------------------------------------------------------------------------------- root only

OK, WHY = available()
needs_root = pytest.mark.skipif(not OK, reason=f"link emulation unavailable: {WHY}")

# Receiver: accept one connection, read to EOF, report bytes and first-to-last-byte time (or echo).
SERVER = r"""
import json, socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2]))); s.settimeout(15)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(15)
if sys.argv[3] == "echo":
    while (b := c.recv(64)):
        c.sendall(b)
    sys.exit(0)
n, t0 = 0, None
while (b := c.recv(1 << 16)):
    t0 = t0 or time.perf_counter(); n += len(b)
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
"""
# Sender: bulk send N bytes, or N timed one-byte ping-pongs (prints the round trip times).
CLIENT = r"""
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if sys.argv[3] == "echo":
    rtts = []
    for _ in range(int(sys.argv[4])):
        t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtts.append(time.perf_counter() - t)
    print(json.dumps(rtts))
else:
    c.sendall(b"\0" * int(sys.argv[4]))
c.close()
"""


def _pair(net: EmulatedNetwork, mode: str, arg: int, port: int = 5201) -> tuple[str, str]:
    """Server on device 0, client on device 1; returns both stdouts."""
    server = subprocess.Popen(net.wrap(0, [PY, "-c", SERVER, net.address(0), str(port), mode]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening", server.stderr.read()
        client = subprocess.run(net.wrap(1, [PY, "-c", CLIENT, net.address(0), str(port), mode, str(arg)]),
                                capture_output=True, text=True, check=False, timeout=20)
        assert client.returncode == 0, client.stderr
        out, err = server.communicate(timeout=20)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
    return out, client.stdout


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _leftovers(prefix: str, pid: int) -> list[str]:
    names = _netns()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False, timeout=10).stdout
    return [n for n in names if n.startswith(f"{prefix}-{pid}-")] + \
           [line for line in links.splitlines() if f"{prefix}{pid}" in line]


@needs_root
def test_bandwidth_counters_and_teardown():
    rate, nbytes = 20.0, 3_000_000  # ~1.2 s at 20 Mbit/s
    with EmulatedNetwork(2, Link(rate), prefix=PREFIX) as net:
        assert not net.delay_emulated
        assert {net.namespace(0), net.namespace(1), net.hub} <= set(_netns())
        tx0, rx0 = net.counters(1)[0], net.counters(0)[1]
        out, _ = _pair(net, "bulk", nbytes)
        got = json.loads(out)
        assert got["bytes"] == nbytes
        mbit = got["bytes"] * 8 / got["seconds"] / 1e6
        print(f"\nthroughput {mbit:.2f} Mbit/s at {rate} Mbit/s configured")
        assert abs(mbit - rate) <= 0.25 * rate, mbit
        assert net.counters(1)[0] - tx0 >= nbytes  # sender's tx, payload plus headers
        assert net.counters(0)[1] - rx0 >= nbytes  # receiver's rx
    assert _leftovers(PREFIX, os.getpid()) == []
    net.close()  # idempotent


@needs_root
def test_teardown_when_body_raises():
    with pytest.raises(ZeroDivisionError), EmulatedNetwork(2, Link(50), prefix=PREFIX) as net:
        # a process left running inside a namespace must not keep it alive
        sleeper = subprocess.Popen(net.wrap(0, ["sleep", "30"]))
        assert _leftovers(PREFIX, os.getpid())
        raise ZeroDivisionError("the body failed")
    assert _leftovers(PREFIX, os.getpid()) == []
    assert sleeper.wait(timeout=5) != 0  # ended by the teardown


@needs_root
def test_cleanup_stale_spares_live_runs():
    with EmulatedNetwork(1, Link(10), prefix=PREFIX) as net:
        cleanup_stale(PREFIX)  # our PID is alive: nothing of ours may go
        assert net.hub in _netns()
        assert net.counters(0) is not None


# A process that builds a network and then exits without close() (atexit tears down) or hangs (to be killed).
# links.py is loaded by path: importing the prism_edge package pulls in torch and transformers (slow).
CHILD = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("links", sys.argv[1])
links = sys.modules["links"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(links)
net = links.EmulatedNetwork(1, links.Link(10, 5), prefix="pt", allow_no_delay=True).open()
print(net.hub, flush=True)
if sys.argv[2] == "hang":
    time.sleep(60)
"""


@needs_root
def test_atexit_and_cleanup_stale():
    from prism_edge.bench import links

    argv = [PY, "-c", CHILD, links.__file__]
    done = subprocess.run([*argv, "exit"], capture_output=True, text=True, check=False, timeout=20)
    assert done.returncode == 0, done.stderr
    hub = done.stdout.strip()
    assert hub.startswith(f"{PREFIX}-") and hub not in _netns()  # removed at exit

    hung = subprocess.Popen([*argv, "hang"], stdout=subprocess.PIPE, text=True)
    hub = hung.stdout.readline().strip()
    assert hub in _netns()
    hung.kill()  # SIGKILL: no atexit, the namespaces stay behind
    hung.wait(timeout=5)
    assert hub in _netns()
    removed = cleanup_stale(PREFIX)
    assert hub in removed and hub not in _netns()
    assert not [n for n in _netns() if n.startswith(f"{PREFIX}-{hung.pid}-")]


@needs_root
@pytest.mark.slow
def test_delay_round_trip():
    delay = 10.0
    try:
        net = EmulatedNetwork(2, Link(100, delay), prefix=PREFIX).open()
    except RuntimeError as e:
        if "iptables" in str(e):
            pytest.skip(str(e))
        raise
    with net:
        assert net.delay_emulated
        _, out = _pair(net, "echo", 20)
        rtts = json.loads(out)[1:]  # the first pays for ARP
        ms = statistics.median(rtts) * 1000
        print(f"\nround trip {ms:.2f} ms at {delay} ms one-way")
        assert abs(ms - 2 * delay) <= 0.25 * 2 * delay, rtts
    assert _leftovers(PREFIX, os.getpid()) == []


GLOO = r"""
import json, sys, time, datetime, torch, torch.distributed as dist
torch.set_num_threads(1)
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
x = torch.zeros(1 << 20)  # 4 MiB of float32
dist.barrier()
t = time.perf_counter()
if rank == 0:
    dist.send(x + 1, 1)
else:
    dist.recv(x, 0)
    assert bool((x == 1).all())
print(json.dumps({"rank": rank, "seconds": time.perf_counter() - t}), flush=True)
dist.destroy_process_group()
"""


@needs_root
@pytest.mark.slow
def test_gloo_send_recv_across_namespaces():
    rate = 20.0
    with EmulatedNetwork(2, Link(rate), prefix=PREFIX) as net:
        procs = [subprocess.Popen(net.wrap(p, [PY, "-c", GLOO, str(p)]), env={**os.environ, **net.gloo_env(p)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(2)]
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outs.append(json.loads(out))
    seconds = outs[1]["seconds"]
    expected = (1 << 22) * 8 / (rate * 1e6)
    print(f"\ngloo 4 MiB send/recv {seconds:.2f} s at {rate} Mbit/s (payload alone {expected:.2f} s)")
    assert abs(seconds - expected) <= 0.25 * expected
