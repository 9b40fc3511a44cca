"""The lab's wheel folder: every wheel a student's offline install needs, CPU-only, per platform.

    python notebooks/lab_wheels.py --out ../wheels --platform windows --python 3.12
    python notebooks/lab_wheels.py --out ../wheels --platform linux windows macos --python 3.11

Each (platform, Python) pair gets its own folder, such as ../wheels/windows-py3.12. One
`pip download -r requirements.txt` would resolve torch from PyPI, whose Linux torch is the CUDA build:
torch with its nvidia-*, cuda-* and triton wheels, gigabytes that an offline install then
prefers. So:
  1. torch alone, without its dependencies: for Linux from the CPU index
     (https://download.pytorch.org/whl/cpu); for Windows and macOS from PyPI, whose torch for them is
     the CPU build (Apple's GPU included).
  2. its dependencies and requirements.txt's, one by one without theirs (--no-deps), following each
     wheel's own list of dependencies with its markers read for the students' platform and Python;
     torch is never asked for again.
Then the folder is checked: one torch wheel, no CUDA wheel (nvidia-*, cuda-*, triton, a +cu torch or a
Linux torch without +cpu), its size; and where the folder is for this very machine, an offline install
into a throwaway virtual environment, the one the students make, must give a torch without CUDA.

Run it on a machine with the network (any platform: pip downloads wheels for the platform named). It
needs pip; the project's own packages are not imported. macOS means Apple silicon: torch has no wheel
for Intel Macs since 2.3.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import venv
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TORCH = "2.13.0"  # the release the project is tested with (.ci/run)
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")  # torch 2.13's wheels; pyproject's requires-python
# The wheel tags each platform's wheels are downloaded for; pip also accepts the older tags these imply
# (manylinux2014, older macOS releases).
PLATFORMS = {"linux": "manylinux_2_28_x86_64", "windows": "win_amd64", "macos": "macosx_14_0_arm64"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
TORCH_INDEX = {"linux": CPU_INDEX, "windows": PYPI, "macos": PYPI}
CUDA_NAMES = re.compile(r"(nvidia|cuda|cupti|cudnn|cublas|nccl|triton|pytorch_triton)[-_]", re.IGNORECASE)


def pip_version() -> str:
    done = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    return done.stdout.split()[1] if done.returncode == 0 else "?"


def cuda_wheels(names) -> list[str]:
    """The file names among `names` that belong to a CUDA build: the NVIDIA runtime wheels, triton
    (the GPU compiler), and a torch wheel that is a CUDA build: a +cuXXX local version, or a Linux
    x86_64/aarch64 torch without +cpu (PyPI's Linux torch is the CUDA build)."""
    found = []
    for name in names:
        if not name.endswith(".whl"):
            continue
        if CUDA_NAMES.match(name):
            found.append(name)
        elif name.startswith("torch-"):
            version = name.split("-")[1]
            local = version.split("+", 1)[1] if "+" in version else ""
            if local.startswith("cu") or local.startswith("rocm") or \
                    ("linux" in name and local != "cpu"):
                found.append(name)
    return found


def pip_env() -> dict:
    """The environment pip runs in: no pip configuration file and no PIP_* index or find-links
    setting of this machine, so that the folder holds what the commands below say, nothing else."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT",
                        "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def run(command: list[str], log) -> None:
    log("$ " + " ".join(command))
    done = subprocess.run(command, env=pip_env(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lab_wheels.py: error: this command failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def download(folder: Path, system: str, python: str, linux_torch: str | None, log) -> None:
    """torch alone, then every other wheel, each requirement by name with --no-deps: pip evaluates
    a dependency's markers (`sys_platform == "linux"`) for the machine it runs on, not for --platform,
    so its own resolver would fetch Linux's dependencies for a Windows folder. Here the markers are
    evaluated for the students' platform and Python."""
    tags = ["--only-binary=:all:", "--platform", PLATFORMS[system], "--python-version", python]
    source = ["--no-index", "--find-links", linux_torch] if linux_torch and system == "linux" else \
        ["--index-url", TORCH_INDEX[system]]

    def fetch(requirement: str, where: list[str]) -> Path:
        before = set(folder.glob("*.whl"))
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder), *tags,
             *where, requirement], log)
        new = set(folder.glob("*.whl")) - before
        name = canonical(Requirement(requirement).name)
        return new.pop() if new else next(w for w in folder.glob("*.whl") if canonical(w.name.split("-")[0]) == name)

    target = marker_environment(system, python)
    queue = requirements_of(fetch(f"torch=={TORCH}" + ("+cpu" if system == "linux" else ""), source))
    queue += [Requirement(line.split("#")[0].strip()) for line in (ROOT / "requirements.txt").read_text()
              .splitlines() if line.split("#")[0].strip()]
    seen = {"torch"}
    while queue:
        req = queue.pop(0)
        if canonical(req.name) in seen or (req.marker is not None and not req.marker.evaluate(target)):
            continue
        seen.add(canonical(req.name))
        queue += requirements_of(fetch(f"{req.name}{req.specifier}", ["--index-url", PYPI]))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_environment(system: str, python: str) -> dict:
    """What a dependency's environment markers read, on the students' machines."""
    os_name, sys_platform, platform_system, machine = {
        "linux": ("posix", "linux", "Linux", "x86_64"), "windows": ("nt", "win32", "Windows", "AMD64"),
        "macos": ("posix", "darwin", "Darwin", "arm64")}[system]
    return {"os_name": os_name, "sys_platform": sys_platform, "platform_system": platform_system,
            "platform_machine": machine, "python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "extra": ""}


def requirements_of(wheel: Path) -> list:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode("utf-8").splitlines()
    return [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]


def check(folder: Path, system: str, python: str, log) -> bool:
    """The folder's wheels and size; an offline install where the folder is for this machine."""
    names = sorted(p.name for p in folder.glob("*.whl"))
    size = sum(p.stat().st_size for p in folder.glob("*.whl"))
    torch_wheels = [n for n in names if n.startswith("torch-")]
    cuda = cuda_wheels(names)
    log(f"{folder.name}: {len(names)} wheels, {size / 2**20:.0f} MiB")
    for name in names:
        log(f"    {name}  {(folder / name).stat().st_size / 2**20:.1f} MiB")
    ok = len(torch_wheels) == 1 and not cuda
    log(f"  one torch wheel: {'yes' if len(torch_wheels) == 1 else 'NO: ' + ', '.join(torch_wheels)}")
    log(f"  CUDA wheels: {'none' if not cuda else 'FOUND: ' + ', '.join(cuda)}")
    if this_machine() == (system, python):
        ok = offline_install(folder, log) and ok
    else:
        log(f"  offline install: not tried here (this machine is {'-py'.join(this_machine())})")
    return ok


def this_machine() -> tuple[str, str]:
    system = {"Linux": "linux", "Windows": "windows", "Darwin": "macos"}.get(platform.system(), "?")
    machine = platform.machine().lower()
    if (system, machine) not in (("linux", "x86_64"), ("windows", "amd64"), ("macos", "arm64")):
        system = "?"
    return system, sysconfig.get_python_version()


def offline_install(folder: Path, log) -> bool:
    """What the students type, without the network: the torch it installs must have no CUDA."""
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(tmp, with_pip=True)
        python = str(Path(tmp, "Scripts" if os.name == "nt" else "bin", "python"))
        run([python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(folder),
             "torch", "-r", str(ROOT / "requirements.txt")], log)
        probe = "import torch, numpy, tqdm, sentencepiece; print(torch.__version__, torch.version.cuda)"
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.split()
        installed = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"], env=pip_env(),
                                   capture_output=True, text=True).stdout.split()
    ok = len(out) == 2 and out[1] == "None"
    log(f"  offline install: torch {out[0] if out else '?'}, CUDA {out[1] if len(out) > 1 else '?'}"
        f" -> {'a CPU-only torch' if ok else 'NOT a CPU-only torch'}")
    log(f"    installed: {' '.join(sorted(installed))}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lab_wheels.py", description="Build and check the lab's "
                                "CPU-only wheel folders, one per platform and Python.")
    p.add_argument("--out", required=True, help="the folder that receives one folder per platform and "
                   "Python (for the USB stick)")
    p.add_argument("--platform", nargs="+", choices=sorted(PLATFORMS), default=["linux"],
                   help="the students' operating systems")
    p.add_argument("--python", nargs="+", choices=PYTHONS, default=["3.11"],
                   help="the students' Python versions (python --version)")
    p.add_argument("--linux-torch-from", default=None, help="a folder that already holds the Linux "
                   "CPU torch wheels (those of the CPU index), used instead of the CPU index")
    p.add_argument("--check-only", action="store_true", help="check the folders, download nothing")
    args = p.parse_args(argv)
    out = Path(args.out)

    def log(line):
        print(line, flush=True)

    log(f"$ python notebooks/lab_wheels.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    log(f"on {platform.platform()} ({platform.machine()}), Python {platform.python_version()}, "
        f"pip {pip_version()}; torch {TORCH}")
    ok = True
    for system in args.platform:
        for python in args.python:
            folder = out / f"{system}-py{python}"
            folder.mkdir(parents=True, exist_ok=True)
            if not args.check_only:
                download(folder, system, python, args.linux_torch_from, log)
            ok = check(folder, system, python, log) and ok
    total = sum(p.stat().st_size for p in out.glob("*/*.whl"))
    log(f"in all: {total / 2**20:.0f} MiB in {out}; " + ("every check passed" if ok else "A CHECK FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
