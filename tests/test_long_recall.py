"""The long-context recall demo (examples/long_recall.py) at a tiny setting: it trains all three
runs, writes its JSON and PNG and reports accuracies in [0, 1]. The accuracy target itself is the
demo's job (minutes of training), not this test's."""
import json
import math
import random

import pytest
import torch

from _examples import example_module

@pytest.fixture(scope="module")
def long_recall():
    with example_module("long_recall") as module:
        yield module


def test_task_layout(long_recall):
    task = long_recall.RecallTask()
    batch = task.sample(4, random.Random(0))
    assert batch.input_ids.shape == (4, task.seq_len) and task.seq_len >= 8 * task.segment_len
    answers = batch.labels.ne(-100)
    assert torch.equal(answers, batch.far | batch.near) and not (batch.far & batch.near).any()
    assert batch.far.sum(1).tolist() == [task.n_queries] * 4
    assert (batch.input_ids[answers] == long_recall.QUERY_TOKEN).all()      # answers sit at the "?"
    for row in range(4):
        ids = batch.input_ids[row]
        for pos in batch.far[row].nonzero().flatten().tolist():
            key, value = ids[pos - 1].item(), batch.labels[row, pos].item()
            pair = [p for p in range(pos - 1) if ids[p] == key]              # the key's earlier occurrence
            assert len(pair) == 1 and ids[pair[0] + 1] == value
            assert pos - (pair[0] + 1) >= task.min_far_distance > 2 * (task.segment_len - 1)  # beyond reach
        for pos in batch.near[row].nonzero().flatten().tolist():
            key = ids[pos - 1].item()
            pair = [p for p in range(pos - 1) if ids[p] == key]
            assert len(pair) == 1 and pos - pair[0] < task.segment_len      # inside the window
    short = task.sample(2, random.Random(0), short=True)
    assert short.input_ids.shape == (2, task.segment_len) and not short.far.any() and short.near.any()


def test_tiny_run_writes_outputs(long_recall, tmp_path, capsys, one_thread):
    out = tmp_path / "recall"
    assert long_recall.main(["--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chance level" in printed and "without memory" in printed

    report = json.loads((out / "long_recall.json").read_text())
    assert set(report["accuracy"]) == {"append", "slots", "none"}
    for accuracies in (report["accuracy"], report["in_window_accuracy"]):
        assert all(0.0 <= a <= 1.0 for a in accuracies.values()), accuracies
    assert math.isclose(report["chance"], 1 / report["task"]["n_values"])
    assert report["runs"]["none"]["config"]["memory_layers"] == []
    assert report["runs"]["append"]["config"]["memory_mode"] == "append"
    assert report["runs"]["slots"]["config"]["memory_mode"] == "slots"
    for run in report["runs"].values():
        curve = run["curve"]
        steps = report["settings"]["short_steps"] + report["settings"]["steps"]
        assert len(curve["train_loss"]) == steps and all(math.isfinite(x) for x in curve["train_loss"])
        assert curve["eval_step"][-1] == steps and len(curve["eval_far_acc"]) == len(curve["eval_step"])
    assert report["wall_s"] > 0
    pytest.importorskip("matplotlib")
    assert (out / "long_recall.png").stat().st_size > 0
