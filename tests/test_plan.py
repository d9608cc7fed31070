"""The partition plan is plain data: slices, segments, exact rows, routes."""

from __future__ import annotations

import pytest
import torch

from prism_edge.partition.plan import make_plan, slice_bounds, split_sizes


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
        make_plan(valid, torch.zeros_like(valid), devices=3, cr=1)


def _plan(valid, cr, halo=0, causal=False, sink=None, devices=2):
    valid = torch.tensor(valid, dtype=torch.bool)
    sink = torch.zeros_like(valid) if sink is None else torch.tensor(sink, dtype=torch.bool)
    return make_plan(valid, sink, devices=devices, cr=cr, halo=halo, causal=causal)


def test_slices_cover_real_positions_once_and_skip_padding():
    plan = _plan([[1] * 10, [1] * 7 + [0] * 3, [0, 0] + [1] * 8], cr=4, devices=3)
    for b, n_real in enumerate([10, 7, 8]):
        owned = torch.cat([sl.index[b][sl.valid[b]] for sl in plan.devices])
        real = torch.nonzero(torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [0, 0] + [1] * 8][b])).flatten()
        assert torch.equal(owned, real)  # contiguous, in order, padding never owned
        assert len(owned) == n_real


def test_segment_means_counts_and_last_segment_shorter():
    # device 0 owns 10 positions: segments of 4 -> counts 4, 4, 2
    plan = _plan([[1] * 20], cr=4)
    route = next(r for r in plan.routes if r.src == 0)
    assert route.counts.tolist() == [4, 4, 2]
    x = torch.arange(10, dtype=torch.float).view(1, 10, 1)
    assert route.compress(x).flatten().tolist() == [1.5, 5.5, 8.5]


def test_padding_never_enters_a_mean():
    plan = _plan([[1] * 6 + [0] * 4, [1] * 10], cr=8)
    route = next(r for r in plan.routes if r.src == 1)  # device 1 owns 3 (seq 0) and 5 (seq 1) rows
    x = torch.zeros(2, 5, 1)
    x[0, :3] = 1.0
    x[0, 3:] = 1e9  # local padding rows of sequence 0
    x[1] = 2.0
    msg = route.compress(x)
    assert msg.flatten().tolist() == [1.0, 2.0]
    assert route.counts.tolist() == [3, 5]


def test_causal_plan_sends_only_forward():
    plan = _plan([[1] * 12], cr=2, causal=True, devices=3)
    assert {(r.src, r.dst) for r in plan.routes} == {(0, 1), (0, 2), (1, 2)}
    bidirectional = _plan([[1] * 12], cr=2, causal=False, devices=3)
    assert len(bidirectional.routes) == 6


def test_sinks_and_halo_rows_are_exact():
    sink = [[1] + [0] * 15]
    plan = _plan([[1] * 16], cr=4, halo=2, causal=True, sink=sink)
    route = plan.routes[0]  # device 0 (positions 0-7) -> device 1
    # position 0 is a sink, 6 and 7 are the halo next to device 1; the rest is averaged per segment
    assert sorted(route.counts.tolist()) == [1, 1, 1, 2, 3]
    exact = route.row_index[route.row_count == 1].tolist()
    assert sorted(exact) == [0, 6, 7]


def test_halo_is_two_sided_only_for_encoders():
    enc = _plan([[1] * 16], cr=8, halo=2)
    back = next(r for r in enc.routes if r.src == 1 and r.dst == 0)
    assert sorted(back.row_index[back.row_count == 1].tolist()) == [8, 9]  # device 1's head borders device 0
    dec = _plan([[1] * 16], cr=8, halo=2, causal=True)
    assert all(r.dst > r.src for r in dec.routes)


def test_halo_only_for_the_neighbour():
    plan = _plan([[1] * 12], cr=4, halo=2, devices=3)
    far = next(r for r in plan.routes if r.src == 0 and r.dst == 2)
    assert far.counts.tolist() == [4]


def test_expand_puts_rows_back_per_sequence():
    plan = _plan([[1] * 8 + [0] * 4, [1] * 12], cr=2)
    route = next(r for r in plan.routes if r.src == 0)
    msg = torch.arange(route.rows, dtype=torch.float).unsqueeze(-1)
    buf = route.expand(msg, 2)
    assert buf.shape == (2, 3, 1)
    assert route.row_valid.tolist() == [[True, True, False], [True, True, True]]
    assert buf[route.row_valid].flatten().tolist() == msg.flatten().tolist()
