"""The times the README and the lab quote, each kept with the machine it was measured on.

    python train.py && python benchmarks/timings.py train out/results.json      # on a free machine
    python train.py && python benchmarks/timings.py train-busy out/results.json # beside other runs
    OMP_NUM_THREADS=1 python train.py && \
        OMP_NUM_THREADS=1 python benchmarks/timings.py train-1-thread-busy out/results.json
    python benchmarks/timings.py tests -- python -m pytest -n 2 --dist loadgroup -q

A name and a results.json: a finished run's training, evaluation and whole-run times, which train.py
measures itself, run under the same OMP_NUM_THREADS as this script; `tests --` runs the command after
`--` and times it. Either one replaces its entry (by name) in benchmarks/results/timings.json with the
time, the command, the date and the machine: its
processor and cores, the torch and Python releases, and the load average, since a machine shared
with other work runs slower than a free one.
"""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plumbing.base import files  # noqa: E402

RECORD = Path(__file__).resolve().parent / "results" / "timings.json"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                    .splitlines() if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "os": platform.platform(),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[1].endswith(".json"):
        results = json.loads(Path(argv[1]).read_text())
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        entry = {"command": f"{threads}python train.py", "seconds": round(results["run_seconds"], 1),
                 "train_seconds": round(results["train_seconds"], 1),
                 "eval_seconds": round(results["eval_seconds"], 1), "environment": results["environment"]}
    elif len(argv) > 2 and argv[0] == "tests" and argv[1] == "--":
        start = time.time()
        done = subprocess.run(argv[2:], capture_output=True, text=True)
        print(done.stdout[-3000:], done.stderr[-2000:], sep="")
        summary = next((line.strip("= ") for line in reversed(done.stdout.splitlines()) if " in " in line), "")
        entry = {"command": " ".join(argv[2:]), "seconds": round(time.time() - start, 1),
                 "exit_code": done.returncode, "summary": summary}
    else:
        sys.exit(__doc__)
    entry.update(date=time.strftime("%Y-%m-%d", time.gmtime()), machine=machine())
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    record[argv[0]] = entry
    RECORD.parent.mkdir(exist_ok=True)
    text = (json.dumps(record, indent=1) + "\n").encode()
    files.write_file(RECORD, lambda f: f.write(text))
    print(f"{argv[0]}: {entry['seconds']} s, recorded in {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
