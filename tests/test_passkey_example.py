"""The passkey example (examples/passkey.py) at a tiny setting: the task's layout, and a smoke run that
trains, evaluates with and without memory and writes its JSON. The accuracy itself is the example's
job (about three minutes of training and evaluation), not this test's."""
import json

import pytest
import torch

from _examples import example_module

pytest.importorskip("transformers", minversion="5.0",
                    reason="the example needs transformers >= 5 (scripts/install.sh installs it)")


@pytest.fixture(scope="module")
def passkey():
    with example_module("passkey") as module:
        yield module


def test_task_layout(passkey):
    ids, answers = passkey.PasskeyTask(512).batch(16, torch.Generator().manual_seed(0))
    assert ids.shape == (16, 512) and (ids[:, -1] == passkey.QUESTION).all()
    for row in range(16):
        where = (ids[row] == passkey.MARKER).nonzero().flatten().tolist()
        assert len(where) == 1 and where[0] + 1 < 512 * 15 // 16
        assert ids[row, where[0] + 1] == answers[row]
        keys = [t for t in ids[row].tolist() if t in passkey.KEYS]
        assert keys == [answers[row].item()]  # the passkey appears once, and only the passkey is a key token


def test_memory_settings_stay_within_the_trained_length(passkey):
    for length in (32, 256, 1000):
        config = passkey.memory_config(length, True)
        assert config["window"] + config["block_size"] + config["chunk_size"] <= length
        assert passkey.memory_config(length, False)["topk_blocks"] == 0


def test_smoke_run_writes_results(passkey, tmp_path, capsys):
    assert passkey.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "passkey.json").read_text())
    results = report["results"]
    assert {(r["factor"], r["memory"]) for r in results} == {(1, True), (1, False), (4, True), (4, False)}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["context"] == 32 * r["factor"] for r in results)
    assert len(report["curve"]) == 3
    assert "accuracy" in capsys.readouterr().out
