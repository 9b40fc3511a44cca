"""benchmarks/gpu_check.py cannot rot between GPU loans: its dry run takes every stage through tiny CPU shapes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes_every_stage(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--budget", "600",
                           "--report-dir", str(tmp_path), "--copy-to", str(tmp_path / "copy")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [report] = tmp_path.glob("gpu-cpu-dry-run-*.md")
    text = report.read_text()
    assert text == (tmp_path / "copy" / report.name).read_text()
    assert text.strip() in proc.stdout  # printed and written alike
    for stage in ("env", "parity", "omoe", "train", "speed", "full-7b", "resume", "torchrun", "compile",
                  "speed-compiled"):
        assert f"## {stage} (ok, " in text, stage
    assert "**10 of 10 stages passed**" in text and "FAIL" not in text
    assert "| OMoE, 2 soft |" in text and "| frozen base (floor) |" in text


def test_stages_that_do_not_fit_the_budget_are_skipped_and_reported(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--stages",
                           "env,parity", "--budget", "1", "--report-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    [report] = tmp_path.glob("gpu-cpu-dry-run-*.md")
    text = report.read_text()
    assert "## env\n\n- skipped: " in text and "## parity\n\n- skipped: " in text
    assert "**0 of 2 stages passed**; not passed: env, parity" in text
