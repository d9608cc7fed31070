"""A dense reference of PRISM's compressed attention, written without the executor, plan or codec.

One "device" holds every position.  Per layer it computes h, Q, K, V for the whole sequence with the
model's own pieces, then, for each simulated device p, builds the key set p would see from the
option's definition (own slice exact, anchors recomputed, and for every other device: sinks, the
window, the top-k rows by the sender's observing queries, and group means of the rest, with int8 or
float16 rounding of what travels) and the whole (queries x keys) score matrix with its mask.  It
handles one unpadded sequence; the tests compare it with `simulate` on padded batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from prism_edge.config import PrismConfig
from prism_edge.models import adapter_for

OBSERVE = 16
ROUNDS = 6


def _sizes(n: int, p: int) -> list[int]:
    return [n // p + (1 if i < n % p else 0) for i in range(p)]


def _round_trip(rows: torch.Tensor, wire: str, group: int) -> torch.Tensor:
    """What the receiver reads back of rows sent at `wire`."""
    if wire == "float32":
        return rows
    if wire in ("float16", "bfloat16"):
        return rows.to(getattr(torch, wire)).float()
    r, w = rows.shape
    g = rows.view(r, w // group, group)
    scale = (g.abs().amax(-1, keepdim=True) / 127).clamp(min=2.0**-14).half().float()
    return (torch.round(g / scale).clamp(-127, 127) * scale).view(r, w)


def _kmeans(x: torch.Tensor, assign: list[int], groups: int) -> list[int]:
    xn = F.normalize(x.float(), dim=-1)
    a = torch.tensor(assign)
    for _ in range(ROUNDS):
        cent = torch.stack([xn[a == g].mean(0) if (a == g).any() else torch.zeros(x.shape[1]) for g in range(groups)])
        a = (xn @ F.normalize(cent, dim=-1).T).argmax(-1)
    return a.tolist()


class Dense:
    def __init__(self, model, cfg: PrismConfig, longest: int | None = None) -> None:
        """`longest`: the longest sequence of the request this one was batched with (it picks the wire
        when int8 gives way to float16 for short requests); default: this sequence's own length."""
        self.ad = adapter_for(model)
        self.cfg = cfg.resolve(self.ad.kind)
        self.g = self.ad.geometry
        self.longest = longest
        self.wire = self.cfg.wire_dtype

    # ---------------------------------------------------------------- what travels src -> dst
    def _split(self, src, dst, b, sink, a_dst, w):
        """(rows the route may carry, exact rows, candidates, segments, top-k floor) with a window of w."""
        c, causal = self.cfg, self.g.causal
        (s, e), (ds, de) = b[src], b[dst]
        cr = c.cr if c.scheme == "prism" else 1
        reals = list(range(max(s, a_dst), e))
        tail_view = c.scheme == "prism" and causal and c.tail > 0 and dst == len(b) - 1
        exact = [r for r in reals if cr == 1 or tail_view or (c.sinks and sink[r]) or ds - w <= r < ds
                 or (not causal and de <= r < de + w)]
        cands = [r for r in reals if r not in exact]
        segs = sorted({(r - s) // cr for r in cands})
        floor = min(len(cands), max(c.topk, math.ceil(c.topk_frac * len(cands)))) if c.scheme == "prism" else 0
        return reals, exact, cands, segs, floor

    def _row_cost(self) -> float:
        """Bytes of one travelling row over a float32 hidden row (Voltage's)."""
        g = self.g
        width, group = (2 * g.kv_width, g.head_dim) if self.payload() == "kv" else (g.hidden, g.hidden)
        size = width + 2 * width // group if self.wire == "int8" else width * {"float32": 4}.get(self.wire, 2)
        return size / (4 * g.hidden)

    def _shares(self, dst, b, sink, anchors):
        """Under a budget: (window, top-k fraction) for every route into dst, from the definition: the routes
        into dst may send budget x (their rows' Voltage bytes); sinks, the floors and one mean per segment
        come first; `budget_window` of what is left (split over the routes next to dst) widens the window;
        what is left after that is the same fraction of every route's candidates as top-k rows."""
        c = self.cfg
        if b[-1][1] < c.budget_from:  # a short sequence: every route whole
            return 0, 1.0
        srcs = [p for p in range(len(b)) if p != dst and not (self.g.causal and p > dst)]
        srcs = [p for p in srcs if b[p][1] > max(b[p][0], anchors[dst])]
        ds, de = b[dst]
        w0 = max(c.window, math.ceil(c.window_frac * (de - ds)))
        if not srcs:
            return w0, 0.0
        cost, count = self._row_cost(), 2 / (4 * self.g.hidden)
        n = sum(len(self._split(p, dst, b, sink, anchors[dst], w0)[0]) for p in srcs)
        can = c.budget * n / cost

        def spent(w):
            parts = [self._split(p, dst, b, sink, anchors[dst], w) for p in srcs]
            return (sum(len(x) + f + len(sg) * (1 + count / cost) for _, x, _, sg, f in parts),
                    sum(len(cd) for _, _, cd, _, _ in parts))

        if can >= n:
            return w0, 1.0
        used, _ = spent(w0)
        if used >= can:
            return w0, 0.0
        beside = [p for p in srcs if b[p][1] == ds or b[p][0] == de]
        w = w0 + int((can - used) * c.budget_window / max(1, len(beside)))
        used, cands = spent(w)
        return w, (max(0.0, can - used) / cands if cands else 0.0)

    def _route(self, src, dst, b, sink, a_dst, scores, h, k, v, share=None):
        """Rows of the key set dst gets from src: list of (k (Hkv, hd), v, count, is_mean)."""
        c = self.cfg
        (s, e), (ds, de) = b[src], b[dst]
        cr = c.cr if c.scheme == "prism" else 1
        w = max(c.window, math.ceil(c.window_frac * (de - ds))) if c.scheme == "prism" else 0
        if share is not None:
            w = share[0]
        reals, exact, cands, segs, topk = self._split(src, dst, b, sink, a_dst, w)
        if share is not None:
            topk = min(len(cands), max(topk, int(share[1] * len(cands))))
            if cands and len(exact) + topk + len(segs) >= len(reals):
                exact, cands, segs, topk = reals, [], [], 0
        elif c.exact_when_cheap and cands and 2 * (len(exact) + topk + len(segs)) >= len(reals):
            exact, cands, segs, topk = reals, [], [], 0
        picks = sorted(cands, key=lambda r: -float(scores[r]))[:topk] if topk else []
        rest = [r for r in cands if r not in picks]
        assign = [segs.index((r - s) // cr) for r in rest]
        kv_payload = self.payload() == "kv"
        if c.grouping == "similarity" and rest:
            feats = k[:, rest].transpose(0, 1).reshape(len(rest), -1) if kv_payload else h[rest]
            assign = _kmeans(feats, assign, len(segs))
        sent = [([r], False) for r in exact + picks] + [([r for r, a in zip(rest, assign) if a == gi], True)
                                                        for gi in range(len(segs))]
        return [self._row(members, is_mean, h, k, v) for members, is_mean in sent if members]

    def payload(self) -> str:
        c = self.cfg
        if c.scheme != "prism":
            return "hidden"
        if c.payload != "auto":
            return c.payload
        return "kv" if self.g.rotary or 2 * self.g.kv_width < self.g.hidden else "hidden"

    def _row(self, members, is_mean, h, k, v):
        g = self.g
        if self.payload() == "kv":
            row = torch.cat([k[:, members].mean(1).reshape(-1), v[:, members].mean(1).reshape(-1)])
            row = _round_trip(row.unsqueeze(0), self.wire, g.head_dim)[0]
            kk, vv = row.split(g.kv_width)
            return kk.view(g.kv_heads, g.head_dim), vv.view(g.kv_heads, g.head_dim), len(members), is_mean
        row = _round_trip(h[members].mean(0, keepdim=True), self.wire, g.hidden)
        kk, vv = self.layer_kv(row)
        if g.rotary:  # exact rows of a hidden payload are rotated at their position by the receiver
            cos, sin = self.ad.rotary(row.unsqueeze(0), torch.tensor([members]))
            kk = apply_rotary_pos_emb(kk.unsqueeze(0), kk.unsqueeze(0), cos, sin)[0][0]
        return kk[:, 0], vv[:, 0], len(members), is_mean

    def layer_kv(self, rows):
        k, v = self.ad.kv(self._layer, rows.unsqueeze(0))
        g = self.g
        return (k.view(-1, g.kv_heads, g.head_dim).transpose(0, 1), v.view(-1, g.kv_heads, g.head_dim).transpose(0, 1))

    # ---------------------------------------------------------------- one layer
    def _scores(self, q, k, local, observe):
        """Attention the observing queries pay each local key (over the local keys only), summed."""
        rep = self.g.heads // self.g.kv_heads
        kk = k[:, local].repeat_interleave(rep, 0)  # (H, n, hd)
        qq = q[:, observe]
        logits = qq @ kk.transpose(-1, -2) * self.ad.scale(self._index)
        if self.g.causal:
            pos_q, pos_k = torch.tensor(observe).view(-1, 1), torch.tensor(local).view(1, -1)
            logits = logits.masked_fill(pos_k > pos_q, float("-inf"))
        weights = logits.float().softmax(-1).sum((0, 1))
        return {r: weights[i] for i, r in enumerate(local)}

    def layer(self, index, x, positions, sink, bounds):
        ad, g, c = self.ad, self.g, self.cfg
        self._index, self._layer = index, ad.layers()[index]
        h = ad.attn_input(self._layer, x)  # (1, N, d)
        q, k, v = ad.qkv(self._layer, h)
        q = q.view(-1, g.heads, g.head_dim).transpose(0, 1)  # (H, N, hd)
        k = k.view(-1, g.kv_heads, g.head_dim).transpose(0, 1)
        v = v.view(-1, g.kv_heads, g.head_dim).transpose(0, 1)
        if g.rotary:
            cos, sin = ad.rotary(x, positions)
            q, k = apply_rotary_pos_emb(q.unsqueeze(0), k.unsqueeze(0), cos, sin)
            q, k = q[0], k[0]
        anchor = c.anchor if (c.scheme == "prism" and g.causal) else 0
        anchors = [min(anchor, s) if p else 0 for p, (s, _) in enumerate(bounds)]
        out = x.clone()
        for p, (s, e) in enumerate(bounds):
            local = list(range(anchors[p])) + list(range(s, e))
            own_k, own_v = k[:, local], v[:, local]
            rows = []
            share = self._shares(p, bounds, sink, anchors) if (c.scheme == "prism" and c.budget) else None
            for src in range(len(bounds)):
                if src == p or (g.causal and src > p):
                    continue
                ss, se = bounds[src]
                src_local = list(range(anchors[src])) + list(range(ss, se))
                owned = list(range(ss, se))
                observe = owned[-OBSERVE:] if p > src else owned[:OBSERVE]
                scores = self._scores(q, k, src_local, observe)
                rows += self._route(src, p, bounds, sink, anchors[p], scores, h[0], k, v, share)
            rk = torch.stack([r[0] for r in rows], 1) if rows else own_k[:, :0]
            rv = torch.stack([r[1] for r in rows], 1) if rows else own_v[:, :0]
            bias = torch.tensor([math.log(r[2]) if (c.count_bias and c.scheme == "prism") else 0.0 for r in rows])
            keys = torch.cat([own_k, rk], 1).repeat_interleave(g.heads // g.kv_heads, 0)
            values = torch.cat([own_v, rv], 1).repeat_interleave(g.heads // g.kv_heads, 0)
            logits = q[:, local] @ keys.transpose(-1, -2) * ad.scale(index)  # (H, n, n_keys)
            n = len(local)
            allowed = torch.ones(n, n + len(rows), dtype=torch.bool)
            if g.causal:
                allowed[:, :n] = torch.tensor(local).view(-1, 1) >= torch.tensor(local).view(1, -1)
                allowed[: anchors[p], n:] = False  # anchors precede everything received
            logits = (logits + torch.cat([torch.zeros(n), bias])).masked_fill(~allowed, float("-inf"))
            ctx = (logits.softmax(-1) @ values).transpose(0, 1).reshape(1, n, -1)  # (1, n, H*hd)
            own = list(range(anchors[p], n))
            idx = torch.tensor([local[i] for i in own])
            out[:, idx] = ad.after_attention(self._layer, x[:, idx], h[:, idx], ctx[:, own])
        return out

    @torch.no_grad()
    def __call__(self, **inputs):
        ad = self.ad
        batch = ad.prepare(sink_token_ids=self.cfg.sink_token_ids, **inputs)
        assert batch.valid.shape[0] == 1 and bool(batch.valid.all()), "one unpadded sequence"
        n = batch.valid.shape[1]
        self.wire = self.cfg.wire_for(self.longest or n)
        devices = self.cfg.effective_devices
        sizes = _sizes(n, devices)
        if self.g.causal and self.cfg.scheme == "prism" and self.cfg.tail and devices > 1:
            last = max(1, min(self.cfg.tail, n - devices + 1))
            sizes = _sizes(n - last, devices - 1) + [last]
        bounds = [(sum(sizes[:p]), sum(sizes[: p + 1])) for p in range(devices)]
        index = torch.arange(n).unsqueeze(0)
        x = ad.embed(batch.gather(index))
        for i in range(self.g.layers):
            x = self.layer(i, x, batch.positions, batch.sink[0].tolist(), bounds)
        out = ad.final(x)
        out.update(ad.pool(out))
        return out
