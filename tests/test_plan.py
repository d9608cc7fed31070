"""The partition plan is plain data: slices, segments, exact rows, routes."""

from __future__ import annotations

import pytest
import torch

from prism_edge.partition.plan import Fidelity, make_plan, slice_bounds, split_sizes
from prism_edge.runtime.message import Codec, decode, encode, pack, summarise, unpack


@pytest.mark.parametrize(
    "length, devices, weights, expected",
    [
        (8, 4, None, (2, 2, 2, 2)),
        (10, 4, None, (3, 3, 2, 2)),
        (13, 3, None, (5, 4, 4)),
        (4, 4, None, (1, 1, 1, 1)),
        (12, 3, (2.0, 1.0, 1.0), (6, 3, 3)),
        (10, 3, (1.0, 1.0, 2.0), (3, 2, 5)),
        (5, 3, (100.0, 1.0, 1.0), (3, 1, 1)),  # every device keeps at least one position
    ],
)
def test_split_sizes(length, devices, weights, expected):
    sizes = split_sizes(length, devices, weights)
    assert sizes == expected and sum(sizes) == length


def test_slice_bounds_half_open():
    assert slice_bounds((3, 2, 2)) == ((0, 3), (3, 5), (5, 7))


def test_more_devices_than_positions_is_refused():
    with pytest.raises(ValueError, match="use devices <= 3"):
        split_sizes(3, 4)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="sequence 1 has 2 real positions"):
        make_plan(valid, torch.zeros_like(valid), devices=3)


def _plan(valid, cr, causal=False, sink=None, devices=2, **fidelity):
    valid = torch.tensor(valid, dtype=torch.bool)
    sink = torch.zeros_like(valid) if sink is None else torch.tensor(sink, dtype=torch.bool)
    return make_plan(valid, sink, devices=devices, fidelity=Fidelity(cr=cr, **fidelity), causal=causal)


def _route(plan, src, dst):
    return next(r for r in plan.routes if r.src == src and r.dst == dst)


def _exact_positions(plan, route, b=0):
    index = plan.devices[route.src].index[b]
    return sorted(index[route.exact[b][route.exact_valid[b]]].tolist())


CODEC = Codec("float32", "contiguous", quant_group=1, cluster_width=1)


def test_slices_cover_real_positions_once_and_skip_padding():
    masks = [[1] * 10, [1] * 7 + [0] * 3, [0, 0] + [1] * 8]
    plan = _plan(masks, cr=4, devices=3)
    for b, n_real in enumerate([10, 7, 8]):
        owned = torch.cat([sl.index[b][sl.owned[b]] for sl in plan.devices])
        real = torch.nonzero(torch.tensor(masks[b])).flatten()
        assert torch.equal(owned, real)  # contiguous, in order, padding never owned
        assert len(owned) == n_real


def test_segment_means_counts_and_last_segment_shorter():
    # device 0 owns 10 positions: segments of 4 -> counts 4, 4, 2
    plan = _plan([[1] * 20], cr=4)
    route = _route(plan, 0, 1)
    assert route.slot_count[0].tolist() == [4, 4, 2] and route.rows == 3
    x = torch.arange(10, dtype=torch.float).view(1, 10, 1)
    rows, counts = summarise(route, x, None, CODEC)
    assert rows.flatten().tolist() == [1.5, 5.5, 8.5] and counts.tolist() == [4, 4, 2]


def test_padding_never_enters_a_mean():
    plan = _plan([[1] * 6 + [0] * 4, [1] * 10], cr=8)
    route = _route(plan, 1, 0)  # device 1 owns 3 (seq 0) and 5 (seq 1) rows
    x = torch.zeros(2, 5, 1)
    x[0, :3] = 1.0
    x[0, 3:] = 1e9  # local padding rows of sequence 0
    x[1] = 2.0
    rows, counts = summarise(route, x, None, CODEC)
    assert rows.flatten().tolist() == [1.0, 2.0] and counts.tolist() == [3, 5]


def test_causal_plan_sends_only_forward():
    plan = _plan([[1] * 12], cr=2, causal=True, devices=3)
    assert {(r.src, r.dst) for r in plan.routes} == {(0, 1), (0, 2), (1, 2)}
    bidirectional = _plan([[1] * 12], cr=2, causal=False, devices=3)
    assert len(bidirectional.routes) == 6


@pytest.mark.parametrize(
    "causal, window, window_frac, src, dst, exact",
    [
        (True, 1, 0.0, 0, 1, [0, 3]),  # the sink (0) and the position just before device 1
        (True, 6, 0.0, 0, 2, [0, 2, 3]),  # the window of device 2 ([2, 8)) reaches into device 0
        (True, 6, 0.0, 1, 2, [4, 5, 6, 7]),
        (False, 2, 0.0, 2, 1, [8, 9]),  # encoders: also the positions just after the receiver
        (False, 2, 0.0, 2, 0, []),  # ... which device 2 does not hold for device 0
        (True, 0, 0.5, 0, 1, [0, 2, 3]),  # half of device 1's 4 rows
    ],
)
def test_sinks_and_window_rows_are_exact(causal, window, window_frac, src, dst, exact):
    sink = [[1] + [0] * 11]
    plan = _plan([[1] * 12], cr=4, causal=causal, sink=sink, devices=3, window=window, window_frac=window_frac)
    assert _exact_positions(plan, _route(plan, src, dst)) == exact


def test_exact_when_cheap_sends_short_slices_as_they_are():
    # an 8-token prompt over 4 devices: a mean of 2 rows would not halve what travels
    cheap = _plan([[1] * 8], cr=16, causal=True, devices=4, exact_when_cheap=True)
    assert all(not r.cand_valid.any() for r in cheap.routes)
    assert sum(r.rows for r in cheap.routes) == 2 * 3 + 2 * 2 + 2  # every earlier position, exactly
    plain = _plan([[1] * 8], cr=16, causal=True, devices=4)
    assert sum(r.rows for r in plain.routes) == 6  # one mean per route
    long = _plan([[1] * 128], cr=16, causal=True, devices=4, exact_when_cheap=True)
    assert all(r.cand_valid.any() for r in long.routes)  # long slices are still summarised


def test_anchor_rows_are_recomputed_not_sent():
    plan = _plan([[1] * 12], cr=2, causal=True, devices=3, anchor=3)
    last = plan.devices[2]
    assert last.index[0].tolist() == [0, 1, 2, 8, 9, 10, 11] and last.anchors == (3,)
    assert last.owned[0].tolist() == [False] * 3 + [True] * 4
    assert plan.devices[0].anchors == (0,)  # device 0 owns them
    for route in plan.routes:  # nobody sends a position its receiver recomputes
        sent = plan.devices[route.src].index[0][torch.cat([route.exact[0][route.exact_valid[0]],
                                                           route.cand[0][route.cand_valid[0]]])]
        assert sent.min() >= 3
    whole = _plan([[1] * 6], cr=2, causal=True, devices=3, anchor=8)  # short: everything recomputed
    assert whole.routes == ()
    with pytest.raises(ValueError, match="causal"):
        _plan([[1] * 12], cr=2, devices=3, anchor=3)


@pytest.mark.parametrize("topk, topk_frac, expected", [(2, 0.0, 2), (0, 0.25, 2), (3, 0.5, 4), (50, 0.0, 7)])
def test_topk_slots(topk, topk_frac, expected):
    plan = _plan([[1] * 16], cr=4, causal=True, sink=[[1] + [0] * 15], topk=topk, topk_frac=topk_frac)
    route = _route(plan, 0, 1)  # 8 rows: the sink exact, 7 candidates
    assert route.k_max == expected and int(route.cand_valid.sum()) == 7
    assert route.width == 1 + expected + 2 and route.rows == 1 + expected + 2


def test_topk_picks_leave_the_means_and_counts_travel():
    plan = _plan([[1] * 16], cr=4, causal=True, topk=2)
    route = _route(plan, 0, 1)  # device 0: positions 0-7 in two segments of 4
    x = torch.arange(8, dtype=torch.float).view(1, 8, 1)
    scores = torch.tensor([[0.0, 9, 0, 0, 0, 0, 0, 8]])  # positions 1 and 7 matter most
    codec = Codec("float32", "contiguous", quant_group=1, cluster_width=1)
    rows, counts = summarise(route, x, scores, codec)
    assert rows.flatten().tolist() == pytest.approx([1.0, 7.0, (0 + 2 + 3) / 3, (4 + 5 + 6) / 3])
    assert counts.tolist() == [3, 3] and codec.counts_travel(route)
    buf, valid, count = unpack(route, pack(route, x, scores, codec), codec, 1, x)
    assert buf[0, :, 0].tolist() == rows.flatten().tolist() and count[0].tolist() == [1, 1, 3, 3]


def test_a_group_emptied_by_picks_is_masked():
    plan = _plan([[1] * 8], cr=2, causal=True, topk=2)
    route = _route(plan, 0, 1)  # device 0: positions 0-3, segments {0, 1} and {2, 3}
    x = torch.arange(4, dtype=torch.float).view(1, 4, 1)
    scores = torch.tensor([[0.0, 0, 5, 6]])
    codec = Codec("float32", "contiguous", quant_group=1, cluster_width=1)
    _, valid, count = unpack(route, pack(route, x, scores, codec), codec, 1, x)
    assert valid[0].tolist() == [True, True, True, False] and count[0, :3].tolist() == [1, 1, 2]


def test_similarity_groups_join_alike_rows():
    plan = _plan([[1] * 16], cr=4, causal=True)
    route = _route(plan, 0, 1)  # 8 rows, 2 contiguous segments
    x = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]]).unsqueeze(0)
    codec = Codec("float32", "similarity", quant_group=2, cluster_width=2)
    rows, counts = summarise(route, x, None, codec)
    assert sorted(rows.tolist()) == [[0.0, 1.0], [1.0, 0.0]] and counts.tolist() == [4, 4]
    contiguous, _ = summarise(route, x, None, CODEC)
    assert contiguous.tolist() == [[0.75, 0.25], [0.25, 0.75]]


def test_int8_wire_round_trip():
    codec = Codec("int8", "contiguous", quant_group=4, cluster_width=8)
    rows = torch.randn(5, 8) * torch.tensor([1.0, 100.0]).repeat_interleave(4)
    q, scale = encode(rows, codec)
    assert q.dtype == torch.int8 and scale.shape == (5, 2) and scale.dtype == torch.float16
    back = decode([q, scale], codec, torch.float32)
    assert ((back - rows).abs() <= scale.float().repeat_interleave(4, dim=1) * 0.51).all()


def test_unpack_puts_rows_back_per_sequence():
    plan = _plan([[1] * 8 + [0] * 4, [1] * 12], cr=2)
    route = _route(plan, 0, 1)
    msg = torch.arange(route.rows, dtype=torch.float).unsqueeze(-1)
    buf, valid, _ = unpack(route, [msg], CODEC, 2, msg)
    assert buf.shape == (2, 3, 1)
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    assert buf[valid].flatten().tolist() == msg.flatten().tolist()


def test_tail_is_a_short_last_slice_that_sees_every_earlier_position_exactly():
    plan = _plan([[1] * 20], cr=4, causal=True, devices=3, tail=4)
    assert [sl.bounds[0] for sl in plan.devices] == [(0, 8), (8, 16), (16, 20)]
    for route in plan.routes:
        exact = _exact_positions(plan, route)
        if route.dst == 2:
            assert exact == list(range(*plan.devices[route.src].bounds[0]))  # nothing summarised
        else:
            assert route.cand_valid.any()  # the route into device 1 is still compressed
    short = _plan([[1] * 5], cr=4, causal=True, devices=3, tail=4)  # too short: everyone keeps a position
    assert [sl.bounds[0] for sl in short.devices] == [(0, 1), (1, 2), (2, 5)]
