import gzip
import io

import pytest
import torch
import torch.nn as nn

from core import metrics


def test_accuracy_confusion_and_per_class_against_hand_values():
    pred = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    true = torch.tensor([0, 1, 2, 2, 2, 0, 0])
    assert metrics.accuracy(pred, true) == pytest.approx(5 / 7)
    cm = metrics.confusion_matrix(pred, true, 3)
    assert cm.tolist() == [[2, 0, 1], [0, 1, 0], [0, 1, 2]]
    assert metrics.per_class_accuracy(pred, true, 3) == pytest.approx([2 / 3, 1.0, 2 / 3])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    assert metrics.accuracy(logits, true) == pytest.approx(5 / 7)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)   # 108 weights
        self.fc = nn.Linear(4, 2)                               # 10 params

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_params_nonzero_and_macs_hand_computed():
    m = Tiny()
    with torch.no_grad():
        m.conv.weight[:2] = 0
    assert metrics.count_params(m) == 118
    assert metrics.count_nonzero_params(m) == 118 - 54
    # conv: 32*32 outputs * 4 channels * 27 MACs; linear: 4*2 MACs + 2 bias adds (torch-pruning's convention)
    assert metrics.count_macs(m) == 32 * 32 * 4 * 27 + 8 + 2


def test_size_is_the_saved_file_and_gzip_shrinks_zeros():
    m = Tiny()
    report = metrics.size_report(m)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    assert report["size_bytes"] == len(buf.getvalue())
    assert report["gzip_bytes"] == len(gzip.compress(buf.getvalue(), compresslevel=metrics.GZIP_LEVEL))
    big = nn.Linear(1000, 1000)
    dense = metrics.size_report(big)
    with torch.no_grad():
        big.weight[:900] = 0
    sparse = metrics.size_report(big)
    assert sparse["size_bytes"] == dense["size_bytes"] and sparse["gzip_bytes"] < dense["gzip_bytes"] / 3


def test_gzip_of_a_multi_chunk_file_is_a_real_gzip_file(monkeypatch):
    monkeypatch.setattr(metrics, "GZIP_CHUNK", 1000)
    raw = metrics.serialized_bytes(nn.Linear(40, 40)) + bytes(5000)
    chunks = [raw[i:i + 1000] for i in range(0, len(raw), 1000)]
    members = b"".join(gzip.compress(c, compresslevel=metrics.GZIP_LEVEL) for c in chunks)
    assert gzip.decompress(members) == raw                 # one valid .gz file, members concatenated
    assert metrics.gzip_size(raw) == len(members) < len(raw)


def test_latency_reports_median_p95_and_threads():
    lat = metrics.measure_latency(Tiny(), batch_size=4, repeats=25, threads=1)
    assert lat.threads == 1 and lat.runs == 25 and len(lat.times_ms) == 25
    assert 0 < lat.median_ms <= lat.p95_ms <= lat.max_ms == max(lat.times_ms)
    assert lat.p95_ms == sorted(lat.times_ms)[23]          # nearest rank: the 24th of 25


def test_a_handful_of_rounds_reports_its_slowest_not_a_p95():
    # 6 rounds cannot give a 95th percentile: the slowest is reported under its own name
    lat = metrics.measure_latency(Tiny(), batch_size=4, repeats=6, threads=1)
    assert lat.p95_ms is None and lat.max_ms == max(lat.times_ms)
    a, b, _ = metrics.compare_latency(Tiny(), Tiny(), batch_size=4, rounds=3, threads=1)
    assert a.p95_ms is None and b.p95_ms is None and a.max_ms == max(a.times_ms)
    assert metrics.tail_p95(Tiny(), metrics.latency_input(1), threads=1) > 0   # 30 single calls: a real one


def test_batch1_is_timed_on_one_thread_and_batch64_on_all():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lat = metrics.latency_pair(Tiny(), repeats_b1=3, repeats_b64=2)
        assert lat["threads_b1"] == 1 and lat["threads"] == 2
        a, b, _ = metrics.compare_latency(Tiny(), Tiny(), batch_size=1, rounds=2)
        assert a.threads == b.threads == 1
        assert metrics.compare_latency(Tiny(), Tiny(), batch_size=64, rounds=2)[0].threads == 2
        assert torch.get_num_threads() == 2        # timing restores the caller's thread count
    finally:
        torch.set_num_threads(before)


def test_interleaved_comparison_sees_a_bigger_model_as_slower():
    small = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    large = nn.Sequential(nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3))
    a, b, speedup = metrics.compare_latency(large, small, batch_size=8, rounds=7, threads=1)
    assert speedup == pytest.approx(a.median_ms / b.median_ms) and speedup > 3
