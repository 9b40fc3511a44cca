"""The teaching notebooks' set-up, imported by their first cell (`import setup`): it finds the
project's files (omoe.py and its neighbours) and puts their folder on sys.path.

From a clone they are one folder up from notebooks/, where the notebooks run (in a hosted notebook,
clone the repository and %cd into its notebooks/ folder); OMOE_ROOT, if set, names the clone's
folder instead. Missing packages are named with the command that installs them; OMOE_INSTALL=1
installs them instead (README.md, "Learning path"): opt-in, so that nothing is ever installed
unasked.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path


def project_root():
    if os.environ.get("OMOE_ROOT"):
        return Path(os.environ["OMOE_ROOT"]).expanduser().resolve()
    return next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "omoe.py").is_file()), None)


ROOT = project_root()
if ROOT is None or not (ROOT / "omoe.py").is_file():
    raise SystemExit(f"omoe.py not found in {ROOT if ROOT else 'this folder or any folder above it'}: clone the "
                     "repository and open the notebook from its notebooks/ folder, or set OMOE_ROOT to the clone")
sys.path.insert(0, str(ROOT))
missing = [m for m in ("torch", "numpy", "tqdm", "sentencepiece", "tokenizers", "matplotlib")
           if importlib.util.find_spec(m) is None]
if missing and os.environ.get("OMOE_INSTALL") == "1":
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt"),
                           "matplotlib"])
elif missing:
    raise SystemExit(f"missing {', '.join(missing)}: pip install -r {ROOT / 'requirements.txt'} matplotlib "
                     "(or set OMOE_INSTALL=1 and run this cell again)")
print("project folder:", os.path.relpath(ROOT))
