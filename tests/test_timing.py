"""The timing instrument's pure parts: the SYN it sends, its statistics, and the baseline
ruleset the packet-rate bench compares with (issue 21, finding 2; benchmarks/timing.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from benchmarks import states
from benchmarks import timing as bench
from reconciler.adapters import files
from reconciler.core import bulk, render, shuffle
from reconciler.lab import timing


@pytest.mark.parametrize(("v", "src", "dst"), [(4, "192.0.2.3", "192.0.2.1"),
                                               (6, "2001:db8::3", "2001:db8::1")])  # fmt: skip
def test_the_syn_is_a_valid_bare_syn(v, src, dst):
    layer = IP if v == 4 else IPv6
    pkt = layer(timing.syn(v, src, dst, 40000, 7, 12345))
    tcp = pkt[TCP]
    assert (pkt.src, pkt.dst, tcp.sport, tcp.dport, str(tcp.flags), tcp.seq) == (
        src, dst, 40000, 7, "S", 12345)  # fmt: skip
    sent = tcp.chksum
    del tcp.chksum  # scapy computes it again from the packet, as the server's kernel checks
    assert layer(bytes(pkt))[TCP].chksum == sent


def test_one_distribution_for_both_kinds_names_no_set_and_shows_no_gap():
    rng = random.Random(3)
    samples = {p: [round(rng.gauss(8.0, 0.2), 2) for _ in range(1000)] for p in range(15)}
    kinds = {p: p < 5 for p in samples}
    g, low, high = timing.gap([x for p in range(5) for x in samples[p]],
                              [x for p in range(5, 15) for x in samples[p]])  # fmt: skip
    assert low <= 0 <= high and abs(g) < 0.02
    # A median of more draws than the samples hold only reads the samples' own medians:
    # the simulation is bounded by what was measured, so ask for no more.
    assert timing.syns_needed(kinds, samples, most=1001, trials=200) is None


def test_a_gap_of_half_the_jitter_takes_hundreds_of_syns_a_quarter_four_times_more():
    rng = random.Random(4)

    def needed(shift: float) -> int | None:
        samples = {p: [rng.gauss(8.0 + (0 if p < 5 else shift), 1.0) for _ in range(4000)]
                   for p in range(15)}  # fmt: skip
        return timing.syns_needed({p: p < 5 for p in samples}, samples, trials=200)

    # Five real ports among fifteen, all named exactly: about (3.3 * 1.77 / (gap / jitter))^2.
    half, quarter = needed(0.5), needed(0.25)
    assert half is not None and quarter is not None
    assert 60 <= half <= 400 and 2.5 <= quarter / half <= 6, (half, quarter)  # (jitter/gap)^2


def test_the_baseline_strips_the_icmp_error_drops_and_nothing_else(tmp_path: Path):
    path = states.write(tmp_path / "state.yaml", 3)
    state = files.load_state(path)
    mapping = shuffle.compute(state, b"\0" * 32, 0)
    commands = render.render(state, mapping)
    dropped = [c for c in commands if bench.icmp_error_drop(c)]
    kept = [c for c in commands if not bench.icmp_error_drop(c)]
    assert dropped, "no ICMP-error drop found: the baseline would be the same ruleset"
    assert all('"icmp' in bulk.dumps(c) and '"drop"' in bulk.dumps(c) for c in dropped)
    assert not any('"field": "type"' in bulk.dumps(c) and '"icmp' in bulk.dumps(c) for c in kept)
    doc, rules = bench.ruleset(state, mapping, bench.SHIPPED, tmp_path / "base.json", True)
    assert rules == sum("rule" in c["add"] for c in kept) and doc.is_file()
