"""Metric definitions against numbers worked out by hand."""

from __future__ import annotations

import pytest

from probes.measures import (
    FreezeDetector,
    Rfc3550Jitter,
    SequenceAccount,
    median,
    mos,
    percentile,
    rfc3550_jitter_of_delays,
)


def test_rfc3550_jitter_follows_the_recurrence() -> None:
    jitter = Rfc3550Jitter(clock_rate=1000)  # 1 tick = 1 ms, to keep the numbers readable
    # packets 20 ms apart in timestamp; transit times 10, 14, 10, 10 ms
    for arrival, ts in [(0.010, 0), (0.034, 20), (0.050, 40), (0.070, 60)]:
        jitter.update(arrival, ts)
    # |D| = 4, 4, 0 ms: J = 0.25, then 0.484375, then 0.4541015625 ms
    assert jitter.value == pytest.approx(0.0004541015625)


def test_rfc3550_jitter_of_delays_is_the_same_recurrence() -> None:
    assert rfc3550_jitter_of_delays([0.010, 0.014, 0.010, 0.010]) == pytest.approx(
        [0.00025, 0.000484375, 0.0004541015625]
    )
    assert rfc3550_jitter_of_delays([0.1]) == []


def test_sequence_account_tells_lost_from_recovered_and_late() -> None:
    account = SequenceAccount()
    for seq in (65533, 65534, 65535, 0, 3, 4):  # wraps; 1 and 2 missing
        account.on_packet(seq)
    assert (account.expected, account.received, account.lost) == (8, 6, 2)
    account.on_retransmission(1)  # RTX brings 1 back: recovered, still lost on first try
    account.on_retransmission(1)  # a second copy is not a second recovery
    assert (account.lost, account.recovered) == (2, 1)
    assert account.on_packet(2) is False  # late original: not lost after all
    assert (account.lost, account.recovered, account.duplicates) == (1, 1, 0)
    account.on_packet(4)
    assert account.duplicates == 1


def test_freeze_detector_applies_the_w3c_rule() -> None:
    freezes = FreezeDetector()
    t = 0.0
    results = []
    for interval in [0.066] * 10 + [0.250, 0.066, 0.210, 0.300, 6.0, 0.066]:
        t += interval
        results.append(freezes.add(t))
    # the first instant has no interval; then 9 normal ones
    assert results[:10] == [None] * 10
    # avg 66 ms: threshold max(198, 216) ms; 250 ms is a freeze and stays out of the average
    assert results[10] == pytest.approx(0.250)
    assert results[11] is None
    assert results[12] is None  # 210 < 216: not a freeze, but it raises the average...
    assert results[13] == pytest.approx(0.300)  # ...to 78 ms: threshold now 234 ms
    assert results[14] is None  # over 5 s: a pause, not a freeze
    assert results[15] is None


def test_freeze_detector_waits_for_five_intervals() -> None:
    freezes = FreezeDetector()
    for t in (0.0, 0.066, 0.132, 0.198, 1.0):
        assert freezes.add(t) is None


def test_mos_follows_the_simplified_e_model() -> None:
    # perfect network: eL = 10 ms, R = 94.518
    r = 94.768 - 10 / 40
    assert mos(0.0, 0.0, 0.0) == pytest.approx(1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r))
    assert mos(0.0, 0.0, 0.0) == pytest.approx(4.43, abs=0.01)
    # 300 ms RTT, 30 ms jitter, 2 % loss: eL = 370, R = 94.768 - 25 - 5 = 64.768
    r = 94.768 - (370 - 120) / 10 - 5
    assert mos(0.3, 0.03, 0.02) == pytest.approx(1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r))
    assert mos(None, 0.0, 0.0) is None
    assert mos(1.0, 0.5, 1.0) == pytest.approx(1 + 0.035 * 6.52 + 7e-6 * 6.52 * -53.48 * 93.48)


def test_percentiles_interpolate() -> None:
    assert percentile([], 50) is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
