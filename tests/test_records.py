"""The times and sizes the README and the lab quote are the records' (benchmarks/results/timings.json,
notebooks/lab_wheels.txt), written as a run prints them, so a new record shows where the text must follow."""

import json
import re
from pathlib import Path

import pytest

from plumbing.cli import duration

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = json.loads((ROOT / "benchmarks" / "results" / "timings.json").read_text())


README = " ".join((ROOT / "README.md").read_text().split())  # the text, its line breaks aside


def test_the_readme_and_the_docs_quote_the_recorded_run_times():
    train = TIMINGS["train"]  # the README's run, on a free machine
    assert train["command"] == "python train.py" and f"in {duration(train['seconds'])}" in README
    assert f"time: training {duration(train['train_seconds'])}, evaluating the fine-tuned model " \
           f"{duration(train['eval_seconds'])}; the whole run " in README  # the output block is that run's
    assert f"{train['machine']['cores']} cores" in README
    # The docs' slow-run symptom: the same command on the same machine busy with other runs.
    busy, one_thread = TIMINGS["train-busy"], TIMINGS["train-1-thread-busy"]
    assert busy["command"] == "python train.py"
    assert one_thread["command"] == "OMP_NUM_THREADS=1 python train.py"
    docs = " ".join((ROOT / "docs" / "when-something-goes-wrong.md").read_text().split())
    assert f"took {duration(busy['seconds'])} on both threads and {duration(one_thread['seconds'])} on one, " \
           f"where the same machine free runs it in {duration(train['seconds'])}" in docs


def test_the_readme_quotes_the_recorded_suite_time():
    tests = TIMINGS.get("tests")
    if tests is None:  # the suite's time is recorded after a run of the suite, this test in it
        pytest.skip("no record of the suite's time yet: python benchmarks/timings.py tests -- python -m pytest ...")
    assert tests["exit_code"] == 0 and f"in {duration(tests['seconds'])}" in README
    assert f"{tests['machine']['cores']} cores" in README


def test_the_lab_quotes_the_recorded_wheel_folders():
    recorded = dict(re.findall(r"^(\w+)-py3\.11: \d+ wheels, (\d+) MiB$",
                               (ROOT / "notebooks" / "lab_wheels.txt").read_text(), re.M))
    assert set(recorded) == {"linux", "windows", "macos"}
    lab = " ".join((ROOT / "notebooks" / "LAB.md").read_text().split())  # the text, its line breaks aside
    for system, name in (("linux", "Linux"), ("windows", "Windows"), ("macos", "macOS")):
        assert f"{recorded[system]} MiB for {name}" in lab
