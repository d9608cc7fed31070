"""The cluster secret: at the rendezvous, a joiner and rank 0 prove to each other that they share it.

Challenge and response through the rendezvous store (rendezvous.take_seat does the store's reads and writes):

  rank 0   offers "hmac-sha256 CHALLENGE" (a fresh random nonce per start-up), or "none" without a secret
  joiner   takes ticket N (the store's atomic counter) and writes {rank, who, nonce, mac}, where
           mac = HMAC-SHA256(secret, join|CHALLENGE|nonce|rank|N|who) and nonce is its own fresh one
  rank 0   compares the mac with its own (hmac.compare_digest) and answers ticket N: "accept PROOF", where
           PROOF = HMAC-SHA256(secret, rank0|CHALLENGE|nonce|rank|N), or "refuse WHY"; the joiner checks
           PROOF before it takes a seat, so it also knows it reached a rank 0 that holds the secret

Only nonces and MACs cross the network, never the secret nor a hash of it alone.  A process with a wrong
or missing secret is refused before it takes a seat, by name on both sides; the group waits on for the
right one.  What it does not do: the store and gloo's own traffic stay unauthenticated and unencrypted (a
party that speaks their protocols can still read or disturb them), so untrusted networks need a tunnel.
Torch-free: pure functions of strings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from .env import SECRET_ENV

SCHEME = "hmac-sha256"
NONE = "none"
WRONG = f"wrong cluster secret (--cluster-secret / {SECRET_ENV} must match rank 0's)"
MISSING = (f"this process has no cluster secret and rank 0 requires one (give it rank 0's --cluster-secret, "
           f"--cluster-secret-file or {SECRET_ENV})")
UNEXPECTED = (f"this process has a cluster secret and rank 0 has none (give every rank the same --cluster-secret / "
              f"{SECRET_ENV}, or none)")


def _mac(secret: str, *fields: object) -> str:
    return hmac.new(secret.encode(), json.dumps(fields).encode(), hashlib.sha256).hexdigest()


def offer(secret: str | None) -> tuple[str, str | None]:
    """Rank 0: (what the store says to joiners, the challenge to keep); a fresh challenge on every call."""
    if not secret:
        return NONE, None
    challenge = secrets.token_hex(16)
    return f"{SCHEME} {challenge}", challenge


def challenge_of(offered: str) -> str | None:
    """The challenge of rank 0's offer (None: rank 0 has no secret, or an offer this version does not know)."""
    scheme, _, challenge = offered.partition(" ")
    return challenge if scheme == SCHEME and challenge else None


def ticket(secret: str | None, challenge: str, rank: int, number: int, who: str) -> dict:
    """A joiner's answer to the challenge, for ticket `number` (an empty mac when it has no secret)."""
    nonce = secrets.token_hex(16)
    mac = _mac(secret, "join", challenge, nonce, rank, number, who) if secret else ""
    return {"rank": rank, "who": who, "nonce": nonce, "mac": mac}


def judge(secret: str, challenge: str, number: int, raw: str) -> tuple[str, str | None]:
    """Rank 0: (the verdict to write for ticket `number`, a line naming whom it refused and why, None if accepted)."""
    try:
        doc = json.loads(raw)
        rank, who, nonce, mac = int(doc["rank"]), str(doc["who"]), str(doc["nonce"]), str(doc["mac"])
    except (ValueError, KeyError, TypeError):
        return "refuse malformed ticket", f"ticket {number} (malformed: {raw[:80]!r})"
    name = f"rank {rank} ({who})"
    if not mac:
        return "refuse no cluster secret", f"{name}: it has no cluster secret"
    if not hmac.compare_digest(mac, _mac(secret, "join", challenge, nonce, rank, number, who)):
        return "refuse wrong cluster secret", f"{name}: wrong cluster secret"
    return f"accept {_mac(secret, 'rank0', challenge, nonce, rank, number)}", None


def check_verdict(secret: str | None, challenge: str, sent: dict, number: int, verdict: str) -> str | None:
    """The joiner: None when rank 0 accepted it and proved it holds the secret, else why it may not join."""
    word, _, rest = verdict.partition(" ")
    if word == "refuse":
        return "refused by rank 0: " + (MISSING if rest == "no cluster secret" else
                                        WRONG if rest == "wrong cluster secret" else rest)
    if word != "accept" or not secret:
        return f"rank 0 answered {verdict[:80]!r}, which this version does not understand"
    if not hmac.compare_digest(rest, _mac(secret, "rank0", challenge, sent["nonce"], sent["rank"], number)):
        return ("rank 0's answer does not prove that it holds the cluster secret: the process at --master is not "
                "this cluster's rank 0 (or the rendezvous was tampered with)")
    return None
