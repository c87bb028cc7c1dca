"""benchmarks/weighting.py at toy size: the output structure and the values that could go wrong."""

import json
import os

import numpy as np
import pytest

from benchmarks import common, weighting


@pytest.mark.slow
def test_weighting_toy(tmp_path):
    settings = weighting.main(["--toy", "--balances=balanced", "--methods=equal,mgda", f"--workdir={tmp_path}"])
    records = common.read_jsonl(os.path.join(tmp_path, "weighting.jsonl"))
    assert [r["record"] for r in records] == ["machine", "setting"]
    (setting,) = settings
    assert json.loads(json.dumps(setting)) == records[1]  # what is returned is what is written
    a = setting["analysis"]
    k, n, rounds = len(a["task_names"]), len(setting["seeds"]), setting["rounds"]
    assert a["reference"] == "equal" and list(a["methods"]) == ["equal", "mgda"] and rounds == 4
    for start, end, target in zip(a["start_loss"], a["reference_end_loss"], a["target_loss"]):
        assert min(start, end) <= target <= max(start, end)
    for m in a["methods"].values():
        for per_seed in m["rounds_to_target_per_seed"]:
            assert len(per_seed) == k and all(r is None or 1 <= r <= rounds for r in per_seed)
        assert all(0 <= r <= n for r in m["rounds_to_target"]["reached"])
        assert all(0 <= x <= 1 for x in m["final_test_metric"]["mean"])  # accuracies
        assert sum(m["final_task_weight"]) == pytest.approx(k, rel=1e-4)  # both methods sum to T
    assert a["methods"]["equal"]["final_task_weight"] == [1.0] * k
    assert not np.allclose(a["methods"]["mgda"]["final_task_weight"], 1.0)
    assert "mgda" in weighting.table(settings)
    assert os.path.getsize(os.path.join(tmp_path, "weighting_synthetic_radcom_balanced.png")) > 0


def test_weighting_benchmark_refuses_unknown_methods():
    with pytest.raises(SystemExit, match="--methods: unknown weighting 'nope'"):
        weighting.main(["--toy", "--methods=equal,nope"])
