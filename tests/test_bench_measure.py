"""The measurement of ``l2m-bench`` (:mod:`l2m_kernels.benchmark`): variants interleaved round by round
with the ceilings, the floors, the machine's load, the table and the peers' rows. These tests check
what is measured and how it is reported, never how fast anything is."""
import subprocess
import sys
import time

import pytest
import torch

from l2m_kernels import benchmark as bm
from l2m_kernels.bench import product_key
from l2m_kernels.ops.product_key.reference import product_key_read_ref

CPU = torch.device("cpu")


def _make_inputs(requires_grad):
    return dict(x=torch.randn(64, 32).requires_grad_(requires_grad))


def test_rounds_interleave_every_variant_and_rotate_the_first(monkeypatch):
    calls = []

    def variant(name):
        def forward(x):
            calls.append(name)
            return x * 2
        return forward

    monkeypatch.setattr(bm, "_ceiling_probes", lambda device, quick: {
        "copy_gbps": ((lambda: calls.append("probe")), 1, 0)})
    rows = bm.compare("op", "s", torch.float32, {"a": variant("a")}, variant("ref"), _make_inputs, CPU,
                      compile_reference=False, peers={"b": bm.Variant("b", variant("b"), backward=False)},
                      reps=4, max_reps=4, warmup=1, rotate_bytes=0)
    assert [r.variant for r in rows] == ["a", "reference", "b"]
    assert all(r.reps == 4 for r in rows) and rows[0].ceilings["copy_gbps"] > 0
    # Each round runs every job once; a variant with a backward calls its forward three times per
    # round (forward alone, forward + backward, forward before the timed backward).
    # Before the rounds: a's and the reference's probe for the backward's cotangents (one call each)
    # and every variant's first, untimed calls (3 + 3 + 1); after them each variant's peak memory run.
    timed = calls[1 + 3 + 1 + 3 + 1:-3]
    rounds = [timed[i:i + 8] for i in range(0, len(timed), 8)]
    assert len(rounds) == 4
    firsts = [r[0] for r in rounds]
    assert firsts == ["a", "ref", "b", "probe"], firsts  # the starting job rotates
    for one in rounds:
        assert sorted(one) == sorted(["a"] * 3 + ["ref"] * 3 + ["b", "probe"])


def test_rounds_stop_once_every_median_is_known():
    steady = bm.Variant("steady", lambda x: x + 1, backward=False)
    sets = [_make_inputs(False)]
    timed = [bm._Timed(steady, sets, CPU, iter(range(10 ** 6)))]
    # A tolerance any spread meets (a finite one can be missed when one timed call is an outlier,
    # such as a cold first call): the rounds stop at the minimum.
    bm.interleave(timed, {}, CPU, warmup=0, reps=5, max_reps=200, max_seconds=60.0, tolerance=float("inf"))
    assert len(timed[0].samples["fwd"]) == 5
    timed = [bm._Timed(steady, sets, CPU, iter(range(10 ** 6)))]
    bm.interleave(timed, {}, CPU, warmup=0, reps=5, max_reps=12, max_seconds=60.0, tolerance=0.0)
    assert len(timed[0].samples["fwd"]) == 12  # an impossible one runs to max_reps


def test_median_uncertainty_is_the_notch():
    assert bm.median_uncertainty([1.0, 1.0, 1.0]) == float("inf")  # too few samples
    assert bm.median_uncertainty([1.0] * 9) == 0.0
    samples = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    q1, _, q3 = __import__("statistics").quantiles(samples, n=4)
    assert bm.median_uncertainty(samples) == pytest.approx(1.57 * (q3 - q1) / 3 / 5.0)


def test_floor_is_the_larger_of_bytes_and_flops():
    ceilings = {"copy_gbps": 10.0, "matmul_gflops_float32": 100.0, "matmul_gflops_bfloat16": 400.0}
    cost = bm.Cost(fwd_bytes=1e9, fwd_flops=2e10, bwd_bytes=3e9, bwd_flops=0)
    assert cost.floor_s(ceilings, "float32", backward=False) == pytest.approx(0.2)   # flops: 20 GFLOP
    assert cost.floor_s(ceilings, "float32", backward=True) == pytest.approx(0.4)    # bytes: 4 GB
    assert cost.floor_s(ceilings, "bfloat16", backward=False) == pytest.approx(0.1)  # bytes, bf16 flops faster
    assert bm.Cost().floor_s(ceilings, "float32", backward=True) is None


def test_rows_report_floors_spreads_and_failures(monkeypatch):
    monkeypatch.setattr(bm, "_ceiling_probes", lambda device, quick: {
        "copy_gbps": ((lambda: None), 2 ** 30, 0), "matmul_gflops_float32": ((lambda: None), 0, 10 ** 9)})

    def broken(x):
        raise RuntimeError("no kernel for this")

    rows = bm.compare("op", "s", torch.float32, {"fused": lambda x: x.exp(), "broken": broken},
                      lambda x: x.exp(), _make_inputs, CPU, compile_reference=False, compile_note="skipped: test",
                      peers={"absent": "not installed: pip install nothing"},
                      cost=bm.Cost(fwd_bytes=2 * 64 * 32 * 4, bwd_bytes=3 * 64 * 32 * 4), reps=3, max_reps=3,
                      warmup=0, rotate_bytes=0)
    by_name = {r.variant: r for r in rows}
    assert list(by_name) == ["fused", "broken", "reference", "reference+compile", "absent"]
    fused = by_name["fused"]
    assert fused.fwd_spread_ms[0] <= fused.fwd_ms <= fused.fwd_spread_ms[1]
    assert fused.floor_multiple > 0 and fused.both_floor_multiple > 0 and fused.peak_mb is not None
    assert "RuntimeError: no kernel for this" in by_name["broken"].note and by_name["broken"].fwd_ms != by_name["broken"].fwd_ms
    assert by_name["reference+compile"].note == "skipped: test"
    assert by_name["absent"].note.startswith("not installed")

    table = bm.format_table(rows).splitlines()
    assert len({line.count("|") for line in table}) == 1  # skipped rows have the header's cells
    assert "not installed" in table[-1] and "1.00x" in table[4]


def test_machine_load_sees_other_processes():
    with bm.MachineLoad() as idle:
        pass
    assert idle.others_cores is None or idle.others_cores >= 0
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with bm.MachineLoad() as load:
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    if load.others_cores is None:
        pytest.skip("no /proc/stat on this system: MachineLoad cannot measure other processes")
    assert load.others_cores > 0.3 and load.busy, load.describe()
    assert "other processes used" in load.describe()


def test_profiler_lines_do_not_reach_stderr(capfd):
    x = torch.randn(32, 32)
    assert bm.peak_memory_bytes(lambda: x @ x, CPU) > 0
    assert "profiler" not in capfd.readouterr().err


def test_plain_pytorch_peer_computes_the_product_key_read():
    torch.manual_seed(0)
    q, subkeys, values = torch.randn(2, 3, 5, 8), torch.randn(3, 2, 6, 4), torch.randn(36, 7)
    out, weights = product_key.plain_pytorch(4, 4, sparse=False)(q, subkeys, values)
    want, _, want_weights, _ = product_key_read_ref(q, subkeys, values, 4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
