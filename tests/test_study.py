"""benchmarks/study.py's bookkeeping: the parameter-matched LoRA rank and the noise rule (the runs
themselves are train.py's, tested in test_train.py and test_assets.py)."""

import importlib.util
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matched_lora_rank_is_the_closest(study):
    target = study.trainable_parameters(["--experts", "2"])
    rank = study.matched_lora_rank(target)
    gaps = {r: abs(study.trainable_parameters(["--lora", "--rank", str(r)]) - target)
            for r in (rank - 1, rank, rank + 1)}
    assert gaps[rank] == min(gaps.values())
    assert gaps[rank] < target * 0.05
    # Two rank-8 experts hold the parameters of one rank-16 LoRA, plus the router: a bit more than rank 16.
    assert rank >= 16


def test_within_noise(study):
    assert study.within_noise([0.50, 0.60, 0.55], [0.52, 0.58, 0.56])
    assert not study.within_noise([0.50, 0.51, 0.52], [0.90, 0.91, 0.92])
    # A large gap with a large spread is still noise under the two-sigma rule.
    assert study.within_noise([0.4, 0.9, 0.6], [0.9, 0.92, 0.91])
