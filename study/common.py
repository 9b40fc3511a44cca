"""What the studies' runners and their reports share: writing files, paths, names and averages.

It imports nothing of the studies, so that every other module here may import it: the runners
(harness.py and the studies built on it) and the reports (report.py, length_report.py, ...)
both stand on it, and neither needs the other for these.
"""
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing.base import files  # noqa: E402


def write_text(path: Path, text: str) -> None:
    """A record or report written whole or not at all, never through a link (the project's one way
    to create a file, plumbing/base/files.py)."""
    files.write_file(path, lambda f: f.write(text.encode()))


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG, written the same way."""
    files.write_file(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))


def portable(path: Path) -> str:
    """A path for a run's flags, relative to the repository (where runs start) when inside it, so that
    the records read the same in any checkout of it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def slug(name: str) -> str:
    """A method's name as a folder name: its records' folder under runs/."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def average(result: dict) -> float:
    """A run's per-task accuracies -> their mean (the published tables average tasks, not questions)."""
    return statistics.mean(result.values())


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
