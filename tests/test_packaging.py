"""The wheel: built without touching the source folders, installed outside the checkout, it runs."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Triton's own model files (python_backend/triton_*.py): they import triton_python_backend_utils, which
# only the stub provides.
TRITON_MODEL_FILES = {
    f"offramp.backend.{path.stem}" for path in (ROOT / "python_backend").glob("triton_*.py")
}


def build_folder_state() -> str:
    """What git sees in build/ (the offramp.build sources), ignored files included."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "build"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the offramp wheel; its dependencies come from this venv's site-packages
    through a .pth line (not its .pth files, so this checkout's editable install stays out)."""
    work = tmp_path_factory.mktemp("wheel")
    before = build_folder_state()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(work),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    after = build_folder_state()
    assert after == before, f"building the wheel wrote into build/ (the offramp.build sources): {after}"
    wheel = next(work.glob("offramp-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    target = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(target) / "offramp_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(venv: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*command], cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)})  # fmt: skip


def test_the_wheel_carries_the_data_files(installed_wheel: Path) -> None:
    wheel = next(installed_wheel.parent.glob("offramp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"offramp/kernels/confidence.cu", "offramp/kernels/compact.cu"} <= names
    assert {
        "offramp/backend/monitoring/grafana_dashboard.json",
        "offramp/backend/monitoring/prometheus_alerts.yml",
    } <= names
    assert not any(name.startswith("tests/") for name in names)


def test_every_subcommand_answers_help_from_the_wheel(installed_wheel: Path, tmp_path: Path) -> None:
    from offramp.client.cli.main import SUBCOMMANDS

    result = _run(installed_wheel, "offramp", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for subcommand in SUBCOMMANDS:
        assert subcommand.name in result.stdout
        helped = _run(installed_wheel, "offramp", subcommand.name, "--help", cwd=tmp_path)
        assert helped.returncode == 0 and helped.stdout.startswith("usage: offramp"), (
            subcommand.name,
            helped.stderr,
        )


def test_gpu_check_from_the_wheel_says_there_is_no_device(installed_wheel: Path, tmp_path: Path) -> None:
    from offramp.client.tools.gpu_check import NO_DEVICE_STATUS, no_device_reason

    if no_device_reason() is None:
        pytest.skip("a CUDA device is visible here: gpu-check would run for real")
    result = _run(installed_wheel, "offramp", "gpu-check", "--quick", cwd=tmp_path)
    assert result.returncode == NO_DEVICE_STATUS, result.stderr
    assert "no CUDA device" in result.stderr


def test_every_module_imports_from_the_wheel(installed_wheel: Path, tmp_path: Path) -> None:
    code = (
        "import importlib, pkgutil, sys, offramp\n"
        f"skip = {sorted(TRITON_MODEL_FILES)!r}\n"
        "names = [m.name for m in pkgutil.walk_packages(offramp.__path__, 'offramp.') if m.name not in "
        "skip]\n"
        "for name in names:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(sys.prefix), module.__file__  # the wheel's copy\n"
        "print(len(names))\n"
    )
    result = _run(installed_wheel, str(installed_wheel / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 40


def test_the_stock_triton_environment_is_made_from_the_installed_packages(
    installed_wheel: Path, tmp_path: Path
) -> None:
    """`build/execution_env.py` copies offramp's server packages into the environment: from a wheel, the
    installed ones (there is no checkout)."""
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from offramp.build.execution_env import copy_server_packages\n"
        "target = copy_server_packages(Path(sys.argv[1]))\n"
        "print(*(p.relative_to(target) for p in sorted(target.rglob('*')) if p.suffix in ('.py', '.cu')))\n"
    )
    result = _run(
        installed_wheel,
        str(installed_wheel / "bin" / "python"),
        "-c",
        code,
        str(tmp_path / "site"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    copied = set(result.stdout.split())
    assert {
        "backend/orchestrator.py",
        "backend/cascade.py",
        "kernels/confidence.cu",
        "kernels/cuda.py",
    } <= copied
