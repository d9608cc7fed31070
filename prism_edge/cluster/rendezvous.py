"""Start-up of a device group: where it meets, who is in it, and the gloo process group, every wait bounded.

  Endpoint       rank 0's HOST:PORT and this machine's address for gloo (default: the one that routes there)
  open_store     the rendezvous store; rank 0 hosts it on the master address only (a local group: loopback)
  take_seat      register this rank and wait for the whole group before gloo is built: a process without the
                 cluster secret (secret.py: challenge and response), a duplicate rank, a rank out of range
                 and a mismatched world size are refused at once with a message naming them; a missing
                 rank ends the wait at the deadline, named, on every rank
  join_group     the gloo process group, built in a helper thread with a deadline (its constructor can hang)

Every function takes a `deadline` (time.monotonic()) that the caller derives from --startup-timeout, so
the whole start-up, not each step, is bounded.  Refusals raise StartupError (a ValueError: the user's
mistake, exit code 2); a group that cannot form raises DeviceLost (exit code 3).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch.distributed as dist

from . import secret as _secret
from .transport import DeviceLost

SEATS = "prism-edge/seat/"  # the store keys of take_seat; gloo's own live under "prism-edge/"
POLL_S = 0.05


class StartupError(ValueError):
    """A process that must not join this group: wrong or missing cluster secret, duplicate rank, rank out of
    range, wrong world size."""


def route_address(host: str) -> str:
    """This machine's address on the route to `host` (a UDP socket is connected; nothing is sent)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise StartupError(f"cannot resolve the master address {host!r} ({err}); give rank 0's IP address in "
                           "--master (or torchrun's --master-addr)") from None
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((sockaddr[0], 9))
        except OSError as err:
            raise StartupError(f"this machine has no route to the master address {host} ({err.strerror}); "
                               "pass --bind ADDR or --iface NAME for the interface that reaches rank 0") from None
        return str(probe.getsockname()[0])


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


@dataclass(frozen=True)
class Endpoint:
    """Where the group meets (the store on rank 0's machine) and which local address gloo binds to."""

    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    bind: str | None = None  # address of this machine's interface to use (hostname or IP)
    iface: str | None = None  # or the interface by name (like GLOO_SOCKET_IFNAME)
    agent_store: bool = False  # torchrun's agent hosts the store: every rank, rank 0 too, is a client

    @classmethod
    def parse(cls, master: str, bind: str | None = None, iface: str | None = None,
              agent_store: bool = False) -> "Endpoint":
        host, sep, port = master.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"--master must be HOST:PORT (e.g. 192.168.1.10:29500), got {master!r}")
        return cls(host.strip("[]"), int(port), bind, iface, agent_store)

    def gloo_address(self) -> str:
        """What gloo binds to and the peers connect to: --iface's (named), --bind, or the route to the master."""
        if self.iface:
            return f"interface {self.iface}"
        return self.bind or route_address(self.master_addr)

    def device(self) -> Any:
        if self.iface:
            return dist.ProcessGroupGloo.create_device(interface=self.iface)
        return dist.ProcessGroupGloo.create_device(hostname=self.gloo_address())


def _listener(endpoint: Endpoint) -> socket.socket:
    """Rank 0's listening socket for the store: on the master address when it is an IP (loopback for a local
    group), on every interface when it is a host name (machines may resolve it differently)."""
    host = endpoint.master_addr
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    family = socket.AF_INET6 if (":" in host if literal else socket.has_ipv6) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and not literal:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
    try:
        sock.bind((host if literal else "", endpoint.master_port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        if family == socket.AF_INET6 and not literal:  # no IPv6 here: every IPv4 interface
            return _listener(Endpoint("0.0.0.0", endpoint.master_port))
        raise StartupError(f"rank 0 cannot host the rendezvous on {endpoint.master_addr}:{endpoint.master_port} "
                           f"({err.strerror}): is another rank 0 (or another program) using that port? Pick another "
                           "--master port, or stop the other group") from None
    return sock


def open_store(endpoint: Endpoint, rank: int, world: int, deadline: float, agent_store: bool = False) -> dist.TCPStore:
    """The rendezvous store: rank 0 hosts it unless torchrun's agent already does (agent_store: all are clients)."""
    master = rank == 0 and not (agent_store or endpoint.agent_store)
    timeout = timedelta(seconds=max(1.0, deadline - time.monotonic()))
    if master:
        sock = _listener(endpoint)
        port = sock.getsockname()[1]  # the one chosen when --master asked for port 0
        fd = sock.detach()  # the store's server owns the socket from here on
        return dist.TCPStore(endpoint.master_addr, port, world, True, timeout=timeout, wait_for_workers=False,
                             master_listen_fd=fd)
    try:
        return dist.TCPStore(endpoint.master_addr, endpoint.master_port, world, False, timeout=timeout)
    except (RuntimeError, OSError) as err:
        raise DeviceLost(f"rank {rank}: cannot reach rank 0's rendezvous at {endpoint.master_addr}:"
                         f"{endpoint.master_port} ({str(err).splitlines()[0]}); check --master and that rank 0 "
                         "is running and reachable from here") from None


class _Seats:
    """take_seat's view of the store: one key per question, no listing needed."""

    def __init__(self, store: dist.Store, rank: int, world: int, deadline: float) -> None:
        self.store = dist.PrefixStore(SEATS, store)
        self.rank, self.world, self.deadline = rank, world, deadline
        self.seen_refusals = 0

    def has(self, *keys: str) -> bool:
        try:
            return bool(self.store.check(list(keys)))
        except (RuntimeError, OSError) as err:  # the store lives in rank 0: it left
            raise self.lost(err) from None

    def text(self, key: str) -> str:
        try:
            return self.store.get(key).decode(errors="replace")
        except (RuntimeError, OSError) as err:
            raise self.lost(err) from None

    def abort(self, why: str, linger: float = 3.0) -> None:
        """Rank 0 gives up the start-up for everyone: say why, and keep the store up until every rank that
        took a seat has read it (or `linger` seconds passed), so that each can name the reason."""
        self.store.set("abort", why)
        seated = sum(1 for r in range(1, self.world) if self.has(f"rank/{r}"))
        end = time.monotonic() + linger
        while self.store.add("abort_seen", 0) < seated and time.monotonic() < end:
            time.sleep(POLL_S)

    def lost(self, err: BaseException) -> DeviceLost:
        if self.rank == 0:
            return DeviceLost(f"rank 0: the rendezvous store failed during start-up ({str(err).splitlines()[0]})")
        missing = ""
        try:  # what rank 0 said before it left, when it said it
            if self.store.check(["abort"]):
                missing = ": " + self.store.get("abort").decode(errors="replace")
        except (RuntimeError, OSError):
            pass
        return DeviceLost(f"rank {self.rank}: rank 0 left during start-up (its rendezvous store closed){missing}")

    def refuse(self, why: str) -> StartupError:
        """Tell rank 0 (it fails the start-up for a wrong world size) and return the error to raise here."""
        n = self.store.add("refusals", 1)
        self.store.set(f"refusal/{n}", why)
        return StartupError(why)

    def new_refusals(self) -> list[str]:
        count = self.store.add("refusals", 0)
        out = [self.text(f"refusal/{n}") for n in range(self.seen_refusals + 1, count + 1)
               if self.has(f"refusal/{n}")]
        self.seen_refusals = count
        return out

    def missing(self) -> list[int]:
        return [r for r in range(self.world) if not self.has(f"rank/{r}")]

    def wait(self, what: Callable[[], bool], on_wait: Callable[[], None] | None) -> bool:
        """Poll `what` until it holds (True) or the deadline passes (False); rank 0 gives up for everyone."""
        while True:
            if what():
                return True
            if self.rank != 0 and self.has("abort"):
                why = self.text("abort")
                self.store.add("abort_seen", 1)  # rank 0 waits for this before it leaves (and the store with it)
                raise DeviceLost(f"rank {self.rank}: rank 0 gave up the start-up: {why}")
            if on_wait is not None:
                on_wait()
            if time.monotonic() > self.deadline:
                return False
            time.sleep(POLL_S)


def _who() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class _Gate:
    """Rank 0's side of the cluster secret: offers a challenge, answers each joiner's ticket while it waits for
    the group, and closes when it stops waiting (a ticket still unanswered then is refused: the group is full)."""

    def __init__(self, seats: _Seats, secret: str | None, log: Callable[[str], None]) -> None:
        self.seats, self.secret, self.log = seats, secret, log
        offered, self.challenge = _secret.offer(secret)
        self.answered, self.pending = 0, set[int]()
        seats.store.set("auth/offer", offered)

    def answer(self) -> None:
        if self.secret is None or self.challenge is None:
            return
        count = self.seats.store.add("auth/tickets", 0)
        self.pending.update(range(self.answered + 1, count + 1))
        self.answered = count
        for n in sorted(self.pending):
            if self.seats.has(f"auth/ticket/{n}"):  # else taken but not written yet: next time
                self.pending.discard(n)
                verdict, refused = _secret.judge(self.secret, self.challenge, n, self.seats.text(f"auth/ticket/{n}"))
                self.seats.store.set(f"auth/verdict/{n}", verdict)
                if refused:
                    self.log(f"warning: rank 0 refused {refused}; it takes no seat, and the group waits for the "
                             "right process")

    def close(self) -> None:
        try:
            self.answer()
            self.seats.store.set("auth/closed", "1")
        except (RuntimeError, OSError, DeviceLost):  # the store failed: the start-up fails on its own account
            pass


def _prove(seats: _Seats, secret: str | None, on_wait: Callable[[], None] | None) -> None:
    """A joiner: answer rank 0's challenge and check its answer, or StartupError naming this process and why."""
    name = f"rank {seats.rank} ({_who()})"
    challenge = _secret.challenge_of(seats.text("auth/offer") if seats.has("auth/offer") else _secret.NONE)
    if challenge is None:
        if secret:
            raise seats.refuse(f"{name}: refused: {_secret.UNEXPECTED}")
        return
    if seats.has("auth/closed"):
        raise StartupError(f"{name}: refused: rank 0 admits no more processes, its group of {seats.world} is "
                           "complete (is this rank started twice?)")
    number = seats.store.add("auth/tickets", 1)
    sent = _secret.ticket(secret, challenge, seats.rank, number, _who())
    seats.store.set(f"auth/ticket/{number}", json.dumps(sent))
    verdict = f"auth/verdict/{number}"
    if not seats.wait(lambda: seats.has(verdict) or seats.has("auth/closed"), on_wait):
        raise DeviceLost(f"{name}: rank 0 did not answer its cluster-secret challenge within the start-up timeout")
    if not seats.has(verdict):
        raise StartupError(f"{name}: refused: rank 0 admits no more processes, its group of {seats.world} is "
                           "complete (is this rank started twice?)")
    problem = _secret.check_verdict(secret, challenge, sent, number, seats.text(verdict))
    if problem:
        raise StartupError(f"{name}: {problem}")


def _rank0_waits(seats: _Seats, gate: _Gate, on_wait: Callable[[], None] | None, log: Callable[[str], None]) -> bool:
    def ready() -> bool:
        gate.answer()
        for why in seats.new_refusals():
            if "--world-size" in why or "out of range" in why:  # the group cannot be what was meant
                seats.abort(why)
                raise StartupError(f"start-up refused: {why}")
            log(f"warning: {why}")  # a duplicate leaves; the group can still form
        return not seats.missing()
    try:
        return seats.wait(ready, on_wait)
    finally:
        gate.close()


def take_seat(store: dist.Store, rank: int, world: int, address: str, deadline: float,
              on_wait: Callable[[], None] | None = None, log: Callable[[str], None] = lambda _: None,
              secret: str | None = None) -> dict[int, str]:
    """Register this rank, then wait until every rank of the group has; returns every rank's gloo address.

    on_wait: called while waiting (rank 0 checks its local workers).  secret: the cluster secret (None: no
    check), proved to rank 0 before anything else.  Refuses (StartupError) a process without rank 0's
    secret, a rank that is already taken, one outside 0..world-1 and a world size other than rank 0's;
    fails (DeviceLost) at the deadline, naming the ranks that never came, on every rank that waits."""
    seats = _Seats(store, rank, world, deadline)
    if rank == 0:
        gate = _Gate(seats, secret or None, log)  # the offer goes up before "world": joiners read it next
        seats.store.set("world", str(world))
    elif not seats.wait(lambda: seats.has("world"), on_wait):
        raise DeviceLost(f"rank {rank}: rank 0 did not open the group within the start-up timeout")
    else:
        _prove(seats, secret or None, on_wait)  # before anything it says can count
    group = int(seats.text("world"))
    if group != world or not 0 <= rank < group:
        raise seats.refuse(f"a process started as rank {rank} with --world-size {world} tried to join a group of "
                           f"{group} rank(s) (ranks 0..{group - 1}){'; rank out of range' if rank >= group else ''}"
                           f": start it with --world-size {group} and a --rank below {group}")
    if seats.store.add(f"rank/{rank}", 1) > 1:
        soon = time.monotonic() + 2.0  # the holder writes who it is right after taking the rank
        while not seats.has(f"who/{rank}") and time.monotonic() < soon:
            time.sleep(POLL_S)
        holder = seats.text(f"who/{rank}") if seats.has(f"who/{rank}") else "another process"
        raise seats.refuse(f"rank {rank} is taken twice: {holder} already holds it, so {_who()} leaves; each "
                           "--rank (torchrun: --node-rank) must run exactly once")
    seats.store.set(f"who/{rank}", _who())
    seats.store.set(f"addr/{rank}", address)
    done = _rank0_waits(seats, gate, on_wait, log) if rank == 0 else seats.wait(lambda: not seats.missing(), on_wait)
    if not done:
        missing = ", ".join(map(str, seats.missing()))
        why = (f"rank(s) {missing} of {world} did not join within the start-up timeout; start each with --rank R "
               f"--world-size {world} --master pointing at rank 0 (or raise --startup-timeout)")
        if rank == 0:
            seats.abort(why)
        raise DeviceLost(f"rank {rank}: {why}")
    addresses = {r: seats.text(f"addr/{r}") for r in range(world)}
    _check_reachable(addresses, rank)
    return addresses


def _check_reachable(addresses: dict[int, str], rank: int) -> None:
    """A rank whose gloo listens on loopback cannot be reached by ranks on other machines: say so before gloo
    waits for connections that cannot come (a host name that resolves to 127.0.x.1, as on Debian)."""
    loop = [r for r, a in addresses.items() if is_loopback(a)]
    other = [r for r, a in addresses.items() if not is_loopback(a) and not a.startswith("interface ")]
    if loop and other:
        r, o = loop[0], other[0]
        raise StartupError(f"rank {rank}: rank {r}'s gloo would listen on {addresses[r]}, a loopback address, while "
                           f"rank {o} is at {addresses[o]} on another machine: start rank {r} with --bind <its "
                           "address on the shared network> or --iface NAME, or give --master as an IP address")


def join_group(store: dist.Store, endpoint: Endpoint, rank: int, world: int, deadline: float, timeout: float,
               addresses: dict[int, str] | None = None,
               on_wait: Callable[[], None] | None = None) -> dist.ProcessGroup:
    """A gloo process group of `world` ranks on the endpoint's interface, formed by the deadline or DeviceLost
    naming the addresses tried.  timeout: gloo's own limit for an operation (the start-up timeout: the
    handshake's all-gather waits for every rank to load its model)."""
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # gloo's options have no stubs
    opts._devices = [endpoint.device()]
    opts._timeout = timedelta(seconds=timeout)  # gloo's own limit for collectives (the handshake waits for loading)
    opts._threads = 2
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["group"] = dist.ProcessGroupGloo(dist.PrefixStore("prism-edge/", store), rank, world, opts)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = err

    thread = threading.Thread(target=build, name="prism-edge-gloo-join", daemon=True)
    thread.start()
    while thread.is_alive() and time.monotonic() < deadline + 2.0:
        thread.join(0.1)
        if on_wait is not None and thread.is_alive():
            on_wait()
    if "group" in box:
        return cast(dist.ProcessGroup, box["group"])
    peers = ", ".join(f"rank {r} at {a}" for r, a in sorted((addresses or {}).items()) if r != rank)
    why = str(box["error"]).splitlines()[0] if "error" in box else "no answer by the start-up deadline"
    raise DeviceLost(f"rank {rank}: could not connect the gloo group of {world} ({why}); tried {peers or 'the peers'}"
                     ": check that these addresses are reachable from this machine, or pass --bind ADDR / "
                     "--iface NAME for the interface that reaches them")
