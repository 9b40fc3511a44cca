"""The lesson files read as prose: ordinary line lengths, and shape tags in view.

nanoGPT's lines average about 50 characters. A file whose lines are packed to the
linter's limit passes the linter and still reads as a wall, so the average is measured
here, over the non-blank lines of each lesson file. A shape tag at a line's end,
`# (N, K, D)`, must end by column 88, where a reader still sees it beside its code.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = ["omoe.py", "model.py", "data.py", "train.py", "generate.py", "evaluate.py"]
MEAN_BELOW = 60
TAG_END = 88


def lines(name: str) -> list[str]:
    return (ROOT / name).read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("name", LESSON)
def test_lines_average_under_60_characters(name):
    text = [line for line in lines(name) if line.strip()]
    mean = sum(map(len, text)) / len(text)
    assert mean < MEAN_BELOW, (f"{name}: its {len(text)} non-blank lines average "
                               f"{mean:.1f} characters (must be under {MEAN_BELOW})")


@pytest.mark.parametrize("name", LESSON)
def test_shape_tags_end_by_column_88(name):
    # A tag after code; a comment line of its own may say "(" freely.
    late = [f"{i}: {line.strip()}" for i, line in enumerate(lines(name), 1)
            if "  # (" in line and line.partition("  # (")[0].strip()
            and len(line) > TAG_END]
    assert not late, f"{name}: shape tags ending past column {TAG_END}:\n" + "\n".join(late)
