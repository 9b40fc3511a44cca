"""notebooks/lab_wheels.py, offline: which wheel names it takes for a CUDA build, and the folders it checks.
(Building a folder downloads; the teacher runs it, and its run here is recorded in notebooks/lab_wheels.txt.)"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lab_wheels", ROOT / "notebooks" / "lab_wheels.py")
lab_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab_wheels)

CPU = ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",   # the CPU index's Linux torch
       "torch-2.13.0+cpu-cp312-cp312-win_amd64.whl",                 # its Windows torch
       "torch-2.13.0-cp312-cp312-win_amd64.whl",                     # PyPI's Windows torch: a CPU build
       "torch-2.13.0-cp311-cp311-macosx_14_0_arm64.whl",             # PyPI's macOS torch: CPU and Apple's GPU
       "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
       "sympy-1.14.0-py3-none-any.whl", "typing_extensions-4.16.0-py3-none-any.whl"]
CUDA = ["torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",       # PyPI's Linux torch: the CUDA build
        "torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl",
        "torch-2.13.0+cu128-cp311-cp311-manylinux_2_28_x86_64.whl",
        "torch-2.13.0+cu128-cp311-cp311-win_amd64.whl",
        "nvidia_cublas_cu12-12.8.4.1-py3-none-manylinux_2_27_x86_64.whl",
        "nvidia-nccl-cu12-2.27.3-py3-none-manylinux2014_x86_64.whl",
        "cuda_bindings-12.9.2-cp311-cp311-manylinux_2_24_x86_64.whl",
        "triton-3.5.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"]


def test_cuda_wheels_are_told_from_cpu_wheels_by_name():
    assert lab_wheels.cuda_wheels(CPU) == []
    assert lab_wheels.cuda_wheels(CUDA + CPU) == CUDA


def test_a_folder_with_a_cuda_wheel_or_two_torches_fails_its_check(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_wheels, "this_machine", lambda: ("elsewhere", "3.11"))  # no offline install
    lines = []
    for name in CPU[:1] + CPU[4:]:
        (tmp_path / name).write_bytes(b"x")
    assert lab_wheels.check(tmp_path, "linux", "3.11", lines.append)
    assert "  CUDA wheels: none" in lines and "  one torch wheel: yes" in lines
    (tmp_path / CUDA[4]).write_bytes(b"x")
    assert not lab_wheels.check(tmp_path, "linux", "3.11", lines.append)
    assert lines[-2] == f"  CUDA wheels: FOUND: {CUDA[4]}"
    (tmp_path / CUDA[4]).unlink()
    (tmp_path / CUDA[0]).write_bytes(b"x")
    assert not lab_wheels.check(tmp_path, "linux", "3.11", lines.append)


def test_every_supported_python_has_the_requires_python_of_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10,<3.15"' in text
    assert lab_wheels.PYTHONS == tuple(f"3.{m}" for m in range(10, 15))


def test_dependencies_follow_the_students_platform_not_this_machines(tmp_path):
    """pip reads a dependency's markers for the machine it runs on; the script reads them for the folder's
    platform and Python: a Windows folder gets colorama and no Linux-only NVIDIA wheel, whatever runs it."""
    import zipfile
    wheel = tmp_path / "torch-2.13.0-cp312-cp312-win_amd64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch-2.13.0.dist-info/METADATA", "Name: torch\nRequires-Dist: filelock\n"
                   'Requires-Dist: nvidia-nccl-cu13==2.29.7; platform_system == "Linux"\n'
                   'Requires-Dist: colorama; platform_system == "Windows"\n'
                   'Requires-Dist: setuptools; python_version >= "3.12"\n'
                   'Requires-Dist: opt-einsum>=3.3; extra == "opt-einsum"\n')
    requirements = lab_wheels.requirements_of(wheel)

    def wanted(system, python):
        env = lab_wheels.marker_environment(system, python)
        return [r.name for r in requirements if r.marker is None or r.marker.evaluate(env)]
    assert wanted("windows", "3.12") == ["filelock", "colorama", "setuptools"]
    assert wanted("linux", "3.11") == ["filelock", "nvidia-nccl-cu13"]  # PyPI's metadata; the CPU wheel has none
    assert wanted("macos", "3.13") == ["filelock", "setuptools"]
