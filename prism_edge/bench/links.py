"""Emulated edge links on one machine: one network namespace per device, joined in a star.

``EmulatedNetwork(devices, link)`` builds, on enter, a hub namespace and one namespace per device.
Device ``p`` owns one end of a veth pair (address ``10.77.(p+1).2/24``); the other end lives in the
hub (``10.77.(p+1).1/24``), which routes between the device subnets. Nothing is created in the root
namespace and no namespace has a route out, so all traffic stays inside the namespaces of the run.

* Bandwidth: ``tc tbf`` at ``link.rate_mbit`` on *both* directions of every device link (egress of
  the device-side veth = uplink, egress of the hub-side veth = downlink). A transfer between two
  devices therefore crosses the sender's uplink and the receiver's downlink, as on a Wi-Fi cell.
* Delay: the kernel has no ``netem``, so ``link.delay_ms`` is emulated in user space. An iptables
  ``NFQUEUE`` rule in the hub's FORWARD chain hands every forwarded packet to a small stdlib-only
  daemon (``_delay_daemon`` below, raw netlink, no libnetfilter_queue) that holds it for
  ``delay_ms`` and then accepts it, in arrival order. ``delay_ms`` is thus the *one-way* delay
  between two devices (a round trip costs ``2 * delay_ms``). It needs ``iptables`` (Debian package
  ``iptables``; ``iptables-legacy`` is used because the kernel lacks ``nft_queue``) and costs CPU
  in the hub: each packet passes through Python, so a few tens of thousands of packets per second
  at most (MTU 9000 at >= 100 Mbit/s keeps the packet rate down). The daemon runs with real-time
  priority (``chrt -f 10``) where allowed, because under CPU load its timer otherwise spikes.
  ``delay_emulated`` says whether delay is in force. Measured here: a 1-byte TCP ping-pong took
  20.7-21.6 ms at 10 ms (2.3-2.5 ms at 1 ms), i.e. each hold is ~0.1-0.8 ms late (wake-up latency);
  bulk TCP still reached 91-99 % of the rate at 10-1000 Mbit/s with 1-20 ms. The daemon exits by
  itself when the process that made the network dies.
* TCP congestion control is reno in every namespace (bbr slows small ping-pongs here).

Names carry a prefix and the creating PID (namespaces ``pe-<pid>-<n>-hub`` and ``pe-<pid>-<n>-d<p>``,
n counting the networks made by the process; interfaces ``pe<pid>d<p>`` / ``pe<pid>h<p>``, at most
15 characters), so concurrent runs do not clash and ``cleanup_stale`` can remove what a killed run left behind. ``close()`` is idempotent,
runs on errors inside the ``with`` body and at interpreter exit, and also ends any process still
running inside the run's namespaces (processes started there through ``wrap``). A SIGKILL'd run
leaves its namespaces behind: call ``cleanup_stale()`` (or ``python -m prism_edge.bench.links
cleanup``).

Needs root, iproute2 (``ip``, ``tc``) and ``sysctl``; see ``available()``.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass

CMD_TIMEOUT_S = 20.0  # every subprocess call is bounded by this
_MAX_IFNAME = 15  # IFNAMSIZ - 1
_PREFIX_RE = re.compile(r"^[a-z]{1,5}$")
_SEQ = itertools.count()


@dataclass(frozen=True)
class Link:
    """One device link: ``rate_mbit`` Mbit/s each way, ``delay_ms`` one-way delay between devices."""

    rate_mbit: float
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rate_mbit", "delay_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Link.{name} must be a finite number, got {value!r}")
        if self.rate_mbit <= 0:
            raise ValueError(f"Link.rate_mbit must be > 0 (Mbit/s, e.g. Link(100) for 100 Mbit/s), got {self.rate_mbit}")
        if self.delay_ms < 0:
            raise ValueError(f"Link.delay_ms must be >= 0 (one-way milliseconds, e.g. Link(100, 5)), got {self.delay_ms}")


PRESETS: dict[str, Link] = {"lan": Link(1000, 1), "wifi": Link(100, 5), "slow": Link(10, 20)}
_LINK_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*mbit\s*(?:,\s*(\d+(?:\.\d*)?)\s*ms\s*)?$", re.IGNORECASE)


def parse_link(text: str) -> Link:
    """A preset name (``lan``, ``wifi``, ``slow``) or ``RATEmbit[,DELAYms]``, e.g. ``50mbit,10ms``."""
    if text.strip().lower() in PRESETS:
        return PRESETS[text.strip().lower()]
    m = _LINK_RE.match(text)
    if m is None:
        raise ValueError(f"bad link {text!r}: use one of {sorted(PRESETS)} or RATEmbit[,DELAYms], e.g. '50mbit,10ms'")
    return Link(float(m.group(1)), float(m.group(2) or 0.0))


# --------------------------------------------------------------------------- subprocess helpers

def _run(argv: list[str], timeout: float = CMD_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` bounded by ``timeout``; RuntimeError naming the command and its stderr on failure."""
    cmd = " ".join(argv)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd}` failed: {argv[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`{cmd}` timed out after {timeout:.0f} s") from e
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{cmd}` failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (ended, not yet reaped by its parent) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no procfs: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _delete_namespace(ns: str) -> None:
    """End the processes left inside ``ns`` (SIGTERM, then SIGKILL), then delete it."""
    pids = [int(x) for x in _run(["ip", "netns", "pids", ns], check=False).stdout.split() if x.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in pids if p != os.getpid() and _pid_alive(p)]
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while pids and time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.02)
    _run(["ip", "netns", "delete", ns])


def cleanup_stale(prefix: str = "pe") -> list[str]:
    """Delete this prefix's namespaces whose creating PID is dead; returns the names removed."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-(\d+-hub|\d+-d\d+|probe)$")
    removed = []
    for ns in _namespaces():
        m = pattern.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_namespace(ns)
            removed.append(ns)
    return removed


_AVAILABLE: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """(True, "") where emulation can run here, else (False, why). Probes once per process."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


def _probe() -> tuple[bool, str]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "link emulation needs root (network namespaces and tc)"
    for tool in ("ip", "tc", "sysctl"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found (install iproute2 / procps)"
    ns = f"pe-{os.getpid()}-probe"
    try:
        if ns in _namespaces():
            _run(["ip", "netns", "delete", ns])
        _run(["ip", "netns", "add", ns])
        try:
            _run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", "tbf", "rate", "10mbit",
                  "burst", "32kb", "latency", "50ms"])
        finally:
            _run(["ip", "netns", "delete", ns])
    except RuntimeError as e:
        return False, f"namespace/tbf probe failed: {e}"
    return True, ""


# --------------------------------------------------------------------------- the network

class EmulatedNetwork:
    """A star of ``devices`` namespaces around a hub, every device link shaped to ``link``.

    Use as a context manager; ``mtu`` defaults to 9000 at >= 100 Mbit/s and 1500 below.
    ``allow_no_delay=True`` builds the network without delay (``delay_emulated`` False, with a
    warning) where the delay holder cannot start, instead of raising.
    """

    def __init__(self, devices: int, link: Link, prefix: str = "pe", *, mtu: int | None = None,
                 allow_no_delay: bool = False) -> None:
        if not isinstance(devices, int) or not 1 <= devices <= 250:
            raise ValueError(f"devices must be an int in [1, 250], got {devices!r}")
        if not isinstance(link, Link):
            raise ValueError(f"link must be a Link (see parse_link), got {link!r}")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must be 1-5 lowercase letters (it names namespaces and interfaces), got {prefix!r}")
        self.mtu = mtu if mtu is not None else (9000 if link.rate_mbit >= 100 else 1500)
        if not 576 <= self.mtu <= 65000:
            raise ValueError(f"mtu must be in [576, 65000], got {self.mtu}")
        self.devices, self.link, self.prefix = devices, link, prefix
        self.allow_no_delay = allow_no_delay
        self.delay_emulated = False
        self._pid = os.getpid()
        self._seq = next(_SEQ)  # several networks may coexist in one process
        if len(self._ifname("d", devices - 1)) > _MAX_IFNAME:
            raise ValueError(f"prefix {prefix!r} + PID {self._pid} + device index exceed {_MAX_IFNAME} "
                             "characters for an interface name: use a shorter prefix")
        self._created: list[str] = []  # namespaces made by this run, hub first
        self._daemon: subprocess.Popen | None = None
        self._state = "new"  # new -> open -> closed

    # names and addresses -------------------------------------------------------------
    def _ifname(self, side: str, p: int) -> str:
        return f"{self.prefix}{self._pid}{side}{p}"

    def _check(self, p: int) -> None:
        if not isinstance(p, int) or not 0 <= p < self.devices:
            raise ValueError(f"device index must be in [0, {self.devices}), got {p!r}")

    @property
    def hub(self) -> str:
        return f"{self.prefix}-{self._pid}-{self._seq}-hub"

    def namespace(self, p: int) -> str:
        self._check(p)
        return f"{self.prefix}-{self._pid}-{self._seq}-d{p}"

    def interface(self, p: int) -> str:
        """Device-side interface of device ``p`` (inside its namespace): GLOO_SOCKET_IFNAME."""
        self._check(p)
        return self._ifname("d", p)

    def address(self, p: int) -> str:
        """Device ``p``'s IPv4 address (exists only inside the run's namespaces)."""
        self._check(p)
        return f"10.77.{p + 1}.2"

    def wrap(self, p: int, argv: list[str]) -> list[str]:
        """``argv`` to run inside device ``p``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(p), *argv]

    def gloo_env(self, p: int, port: int = 29500, master: int = 0) -> dict[str, str]:
        """Environment for a torch.distributed gloo process on device ``p`` (rank ``master`` serves the store)."""
        return {"MASTER_ADDR": self.address(master), "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": self.interface(p)}

    def counters(self, p: int) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) of device ``p``'s interface, read inside its namespace."""
        out = _run(["ip", "-n", self.namespace(p), "-j", "-s", "link", "show", "dev", self.interface(p)]).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    # lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> EmulatedNetwork:
        return self if self._state == "open" else self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the body's exception with a teardown error
            self.close()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"EmulatedNetwork teardown failed: {e}", RuntimeWarning, stacklevel=2)

    def open(self) -> EmulatedNetwork:
        if self._state != "new":
            raise RuntimeError(f"EmulatedNetwork is {self._state}; make a new one")
        ok, why = available()
        if not ok:
            raise RuntimeError(f"link emulation unavailable: {why}")
        self._state = "open"
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:  # includes KeyboardInterrupt: leave nothing behind
            try:
                self.close()
            except Exception as e:  # noqa: BLE001 - report the build error, not the teardown's
                warnings.warn(f"EmulatedNetwork teardown failed: {e}", RuntimeWarning, stacklevel=2)
            raise
        return self

    def _add_namespace(self, ns: str) -> None:
        self._created.append(ns)  # recorded first, so a half-made namespace is still torn down
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        sysctls = ["net.ipv4.tcp_congestion_control=reno",
                   "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]  # no stray ND traffic
        if ns == self.hub:
            sysctls.append("net.ipv4.ip_forward=1")
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls])

    def _tbf(self, ns: str, dev: str) -> None:
        rate_bytes = self.link.rate_mbit * 1e6 / 8
        frame = self.mtu + 64  # the bucket must hold a whole frame
        burst = max(2 * frame, int(rate_bytes * 0.002))  # ~2 ms of line rate: short bursts stay faithful
        # Queue: ~50 ms of line rate plus the delay's bandwidth-delay product, so TCP can fill the pipe.
        limit = max(burst + 8 * frame, int(rate_bytes * (0.05 + 2 * self.link.delay_ms / 1000)))
        _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", f"{int(self.link.rate_mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit)])

    def _build(self) -> None:
        # Our names can already exist only if a dead process with our PID left them: remove them.
        stale = set(_namespaces()) & {self.hub, *(self.namespace(p) for p in range(self.devices))}
        for ns in stale:
            _delete_namespace(ns)
        self._add_namespace(self.hub)
        for p in range(self.devices):
            ns, dev, hub_dev = self.namespace(p), self.interface(p), self._ifname("h", p)
            self._add_namespace(ns)
            # Created straight into the two namespaces: nothing ever appears in the root namespace.
            _run(["ip", "-n", ns, "link", "add", dev, "mtu", str(self.mtu), "type", "veth",
                  "peer", "name", hub_dev, "mtu", str(self.mtu), "netns", self.hub])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(p)}/24", "dev", dev])
            _run(["ip", "-n", self.hub, "addr", "add", f"10.77.{p + 1}.1/24", "dev", hub_dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", self.hub, "link", "set", hub_dev, "up"])
            _run(["ip", "-n", ns, "route", "add", "10.77.0.0/16", "via", f"10.77.{p + 1}.1"])
            self._tbf(ns, dev)  # uplink
            self._tbf(self.hub, hub_dev)  # downlink
        if self.link.delay_ms > 0:
            try:
                self._start_delay()
            except RuntimeError as e:
                if not self.allow_no_delay:
                    raise
                warnings.warn(f"delay not emulated: {e}", RuntimeWarning, stacklevel=3)

    def _start_delay(self) -> None:
        iptables = shutil.which("iptables-legacy")
        if iptables is None:
            raise RuntimeError("delay needs `iptables-legacy` (apt-get install -y iptables): the kernel has no netem")
        argv = [sys.executable, os.path.abspath(__file__), "_delayd", "--delay-ms", str(self.link.delay_ms),
                "--owner", str(self._pid)]
        if shutil.which("chrt") and _run(["chrt", "-f", "10", "true"], check=False).returncode == 0:
            argv = ["chrt", "-f", "10", *argv]  # real-time priority keeps the hold time steady under load
        daemon = self._daemon = subprocess.Popen(["ip", "netns", "exec", self.hub, *argv], stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert daemon.stdout is not None and daemon.stderr is not None
        ready, _, _ = select.select([daemon.stdout], [], [], CMD_TIMEOUT_S)
        line = daemon.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self._stop_daemon()
            raise RuntimeError(f"delay daemon did not start: {line.strip()} {daemon.stderr.read().strip()}")
        # No --queue-bypass: if the daemon dies, traffic stops instead of silently losing its delay.
        _run(["ip", "netns", "exec", self.hub, iptables, "-w", "5", "-A", "FORWARD", "-j", "NFQUEUE",
              "--queue-num", "0"])
        self.delay_emulated = True

    def _stop_daemon(self) -> None:
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.terminate()
            try:
                self._daemon.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._daemon.kill()
                self._daemon.wait(timeout=3)

    def close(self) -> None:
        """Tear down everything this run made (idempotent; a no-op in forked children)."""
        if self._state != "open" or os.getpid() != self._pid:
            return
        errors = []
        try:
            self._stop_daemon()
        except Exception as e:  # noqa: BLE001 - keep tearing down
            errors.append(str(e))
        self.delay_emulated = False
        existing = set(_namespaces())
        for ns in reversed(self._created):  # deleting a device namespace also removes its veth pair
            if ns in existing:
                try:
                    _delete_namespace(ns)
                except RuntimeError as e:
                    errors.append(str(e))
        if errors:  # stay open (and registered with atexit) so a later close() retries
            raise RuntimeError("EmulatedNetwork teardown incomplete: " + "; ".join(errors))
        self._state = "closed"
        atexit.unregister(self.close)


# --------------------------------------------------------------------------- delay holder (hub namespace)

_NETLINK_NETFILTER, _NFNL_SUBSYS_QUEUE = 12, 3
_MSG_PACKET, _MSG_CONFIG, _MSG_VERDICT_BATCH = 0, 2, 3
_NLM_F_REQUEST, _NLM_F_ACK, _NLMSG_ERROR = 1, 4, 2
_CFG_CMD, _CFG_PARAMS, _CFG_QUEUE_MAXLEN, _CFG_MASK, _CFG_FLAGS = 1, 2, 3, 4, 5
_CMD_BIND, _COPY_META, _F_GSO, _NF_ACCEPT = 1, 1, 4, 1


def _nfq_msg(msg: int, flags: int, queue: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue))  # nfgenmsg
    for kind, data in attrs:
        body += struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)
    return struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | msg, _NLM_F_REQUEST | flags, 0, 0) + body


def _packet_ids(buf: bytes) -> list[int]:
    """Packet ids of the NFQNL_MSG_PACKET messages in one netlink datagram."""
    ids, off = [], 0
    while off + 16 <= len(buf):
        length, kind = struct.unpack_from("=IH", buf, off)
        if length < 16:
            break
        if kind == _NLMSG_ERROR:
            err = struct.unpack_from("=i", buf, off + 16)[0]
            if err:
                raise OSError(-err, f"nfqueue: {os.strerror(-err)}")
        elif kind == (_NFNL_SUBSYS_QUEUE << 8) | _MSG_PACKET:
            a = off + 20  # past nlmsghdr + nfgenmsg
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", buf, a)
                if alen < 4:
                    break
                if atype & 0x3FFF == 1:  # NFQA_PACKET_HDR: be32 packet_id, ...
                    ids.append(struct.unpack_from("!I", buf, a + 4)[0])
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids


def _delay_daemon(delay_ms: float, owner: int, queue: int = 0) -> None:
    """Hold every packet of NFQUEUE ``queue`` for ``delay_ms``, accept in order; exit when ``owner`` dies."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: a burst must not overflow it
    sock.bind((0, 0))
    for attrs in ([(_CFG_CMD, struct.pack("!BxH", _CMD_BIND, 0))],
                  [(_CFG_PARAMS, struct.pack("!IB", 0, _COPY_META)), (_CFG_QUEUE_MAXLEN, struct.pack("!I", 20000)),
                   (_CFG_MASK, struct.pack("!I", _F_GSO)), (_CFG_FLAGS, struct.pack("!I", _F_GSO))]):
        sock.send(_nfq_msg(_MSG_CONFIG, _NLM_F_ACK, queue, attrs))
        _packet_ids(sock.recv(65536))  # the ack; raises on error
    sock.setblocking(False)
    print("ready", flush=True)
    hold = delay_ms / 1000
    held: deque[tuple[float, int]] = deque()  # (release time, packet id), FIFO
    next_owner_check = 0.0
    while True:
        now = time.monotonic()
        last = None
        while held and held[0][0] <= now:
            last = held.popleft()[1]
        if last is not None:  # one batch verdict accepts every queued id <= last
            sock.send(_nfq_msg(_MSG_VERDICT_BATCH, 0, queue, [(2, struct.pack("!II", _NF_ACCEPT, last))]))
        if now >= next_owner_check:
            if not _pid_alive(owner):
                return
            next_owner_check = now + 0.5
        wait = min(0.5, held[0][0] - now) if held else 0.5
        if select.select([sock], [], [], max(wait, 0.0))[0]:
            for _ in range(1024):  # drain what is there, bounded
                try:
                    buf = sock.recv(65536)
                except BlockingIOError:
                    break
                t = time.monotonic() + hold
                held.extend((t, i) for i in _packet_ids(buf))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m prism_edge.bench.links", description="Emulated edge links")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="say whether emulation can run here")
    sub.add_parser("cleanup", help="remove namespaces left by dead runs").add_argument("--prefix", default="pe")
    d = sub.add_parser("_delayd", help=argparse.SUPPRESS)
    d.add_argument("--delay-ms", type=float, required=True)
    d.add_argument("--owner", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        ok, why = available()
        print("available" if ok else f"unavailable: {why}")
    elif args.cmd == "cleanup":
        print("\n".join(cleanup_stale(args.prefix)) or "nothing to remove")
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _delay_daemon(args.delay_ms, args.owner)


if __name__ == "__main__":
    main()
