"""examples/store_eviction.py at a tiny setting: it trains, evaluates every policy at half
capacity and the whole context, and writes its JSON with recalls in [0, 1]. The comparison itself
(usage against FIFO) is the example's job (two minutes of training), not this test's."""
import json

from _examples import example_module


def test_store_eviction_example_runs(tmp_path):
    with example_module("store_eviction") as module:
        assert module.main(["--tiny", "--sequences", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "store_eviction.json").read_text())
    assert len(result["far_recall"]) == 4
    assert all(0.0 <= value <= 1.0 for value in result["far_recall"].values())
    assert result["capacity_half"] < result["entries_needed"]
