"""The orchestrator's Python environment for a stock Triton server (its ``EXECUTION_ENV_PATH``).

NVIDIA's Triton image runs Python models in its own Python, with little installed. The orchestrator
needs NumPy below 2 (NumPy 2 broke the stub: docs/embedded-server.md), ``tokenizers`` for text
models, Pillow for image models (it decodes ``IMAGE_BYTES``), CuPy for the GPU path, and offramp's
server side (``offramp.backend`` and ``offramp.kernels``; nothing of the build, no torch).
``create_execution_env`` makes that environment:

1. a virtualenv at OUT, made by ``--python`` (default: the running interpreter), without pip;
2. the requirements installed into its site-packages with that Python's pip (``--target``);
3. offramp's server packages copied in (from this checkout, so nothing needs installing first);
4. its ``bin/activate`` made relocatable: the stub sources it wherever the environment ends up
   (Triton unpacks a ``.tar.gz`` into a folder of its own choosing);
5. the interpreter's shared ``libpython`` linked into ``OUT/lib``, which the stub puts first on its
   library path (see ``offramp.backend.environment``);
6. with ``--archive``, ``OUT.tar.gz`` as well, which Triton unpacks itself.

The environment's Python must be the one the Triton image's Python stub embeds (``python3 --version``
inside the image: 3.10 in the 24.xx images, 3.12 in 25.xx): a virtualenv links to its interpreter
by absolute path, so build it inside the image that will serve it. This file uses the standard
library only, so it runs there straight from a checkout:

    docker run --rm -v $PWD:/work -w /work nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
        python3 build/execution_env.py model_repository/offramp_env --gpu --text

``triton_server_flags`` gives the server options it needs (shared memory, the CUDA memory pool).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _load_environment_by_path() -> ModuleType:
    """``offramp.backend.environment`` loaded from this checkout's file (standard library only too)."""
    spec = importlib.util.spec_from_file_location(
        "offramp_environment", PROJECT_ROOT / "python_backend" / "environment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The libpython linker is offramp.backend.environment's. Run as a plain script (in NVIDIA's image, from a
# checkout where offramp is not installed), this file has no package and takes that module from its file.
if __package__:
    from offramp.backend.environment import LIBPYTHON_CONFIG_VARS, link_libpython, shared_libpython
else:
    _environment = _load_environment_by_path()
    LIBPYTHON_CONFIG_VARS = _environment.LIBPYTHON_CONFIG_VARS
    link_libpython, shared_libpython = _environment.link_libpython, _environment.shared_libpython

# offramp's subpackages the orchestrator imports, and their folders in a checkout (pyproject's mapping).
SERVER_PACKAGES = {"backend": "python_backend", "kernels": "kernels"}
# Pinned as the project's own venv has them (requirements.txt); the stub needs NumPy below 2.
NUMPY = "numpy==1.26.4"
TOKENIZERS = "tokenizers>=0.19,<1"
# Image.open(formats=...) and Image.Resampling (offramp.backend.image) need Pillow 9.1 or later.
PILLOW = "pillow>=9.1,<14"
# For images on CUDA 12 (the image's release notes say which CUDA); cupy-cuda13x==13.6.0 for CUDA 13.
CUPY = "cupy-cuda12x==13.6.0"
RELOCATABLE_ENV = '_OFFRAMP_ENV="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"'

Run = Callable[..., subprocess.CompletedProcess]


def server_requirements(
    gpu: bool = False, text: bool = False, cupy: str = CUPY, images: bool = False
) -> list[str]:
    """What the orchestrator imports besides the standard library and offramp."""
    return [NUMPY, *([TOKENIZERS] if text else []), *([PILLOW] if images else []), *([cupy] if gpu else [])]


def _query(python: str, expression: str, run: Run) -> str:
    command = [python, "-c", f"import json, sysconfig; print({expression})"]
    result = run(command, check=True, capture_output=True, text=True)
    return result.stdout.strip()


def server_package_folders() -> dict[str, Path]:
    """Where ``offramp.backend`` and ``offramp.kernels`` are: the installed packages' folders, or, run as
    a plain script from a checkout, the checkout's folders."""
    if not __package__:
        return {package: PROJECT_ROOT / folder for package, folder in SERVER_PACKAGES.items()}
    folders = {}
    for package in SERVER_PACKAGES:
        spec = importlib.util.find_spec(f"offramp.{package}")
        folders[package] = Path(next(iter(spec.submodule_search_locations)))
    return folders


def copy_server_packages(site_packages: Path) -> Path:
    """``offramp/backend`` and ``offramp/kernels`` (with the ``.cu`` sources) under ``site_packages``;
    ``offramp`` itself stays a namespace package, as installed."""
    target = site_packages / "offramp"
    for package, source in server_package_folders().items():
        destination = target / package
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(
            source, destination, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        )
    return target


def make_activate_relocatable(env: Path) -> Path:
    """Rewrites ``bin/activate`` to find the environment from its own location instead of the path
    it was created at (the path appears in it once or twice, depending on the Python version)."""
    activate = env / "bin" / "activate"
    text = activate.read_text()
    created_at = next((str(p) for p in (env.absolute(), env.resolve()) if str(p) in text), None)
    if created_at is None:
        raise RuntimeError(f"{activate} does not name {env}; cannot make it relocatable")
    activate.write_text(f"{RELOCATABLE_ENV}\n" + text.replace(created_at, "${_OFFRAMP_ENV}"))
    return activate


def link_interpreter_libpython(env: Path, python: str, run: Run = subprocess.run) -> Path | None:
    """Links ``python``'s shared libpython into ``env/lib`` (the stub loads it from there); None where
    that Python has no shared library (then the stub's own libpython must match)."""
    values = _query(python, f"json.dumps(sysconfig.get_config_vars(*{LIBPYTHON_CONFIG_VARS!r}))", run)
    config_vars = dict(zip(LIBPYTHON_CONFIG_VARS, json.loads(values)))
    library = shared_libpython(config_vars)
    return link_libpython(env, library, config_vars["INSTSONAME"]) if library is not None else None


def archive_env(env: Path) -> Path:
    """``<env>.tar.gz`` with the environment's contents at its top, as Triton unpacks it."""
    archive = env.with_name(env.name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(env.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


def create_execution_env(
    out: Path,
    requirements: Sequence[str],
    python: str = sys.executable,
    pip_args: Sequence[str] = (),
    archive: bool = False,
    run: Run = subprocess.run,
) -> Path:
    """Makes the environment at ``out`` (replacing it) and returns it, or its ``.tar.gz`` with ``archive``."""
    out = Path(out).absolute()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run([python, "-m", "venv", "--without-pip", str(out)], check=True)
    env_python = str(out / "bin" / "python")
    site_packages = Path(_query(env_python, "sysconfig.get_paths()['purelib']", run))
    if requirements:
        # The builder's pip installs into the environment's site-packages: the environment needs no pip
        # of its own (ensurepip is missing from some system Pythons).
        command = [python, "-m", "pip", "install", "--no-user", "--target", str(site_packages), *pip_args]
        run([*command, *requirements], check=True)
    copy_server_packages(site_packages)
    make_activate_relocatable(out)
    link_interpreter_libpython(out, python, run)
    return archive_env(out) if archive else out


def triton_server_flags(
    shm_default_bytes: int | None = 64 << 20,
    shm_growth_bytes: int = 64 << 20,
    cuda_pool_bytes: int | None = None,
) -> list[str]:
    """``tritonserver`` options for the generated repository on a stock server.

    Each Python-model instance (every orchestrator instance, and every segment on the embedded
    target) starts with ``shm_default_bytes`` of /dev/shm (None: the backend's own default) and
    grows by ``shm_growth_bytes``, never shrinking; its largest BLS tensors must fit. GPU tensors
    between the orchestrator and the segments go through the CUDA memory pool (``cuda_pool_bytes``
    on GPU 0; give one per GPU).
    """
    flags = [f"--backend-config=python,shm-growth-byte-size={shm_growth_bytes}"]
    if shm_default_bytes is not None:
        flags.insert(0, f"--backend-config=python,shm-default-byte-size={shm_default_bytes}")
    if cuda_pool_bytes is not None:
        flags.append(f"--cuda-memory-pool-byte-size=0:{cuda_pool_bytes}")
    return flags


def shared_memory_bytes(
    python_instances: int, max_batch: int, largest_row_bytes: int, shm_default_bytes: int
) -> int:
    """A /dev/shm size (docker ``--shm-size``) for ``python_instances`` Python-model instances: each its
    default region, plus room for a request and a response of ``max_batch`` rows of the largest BLS
    tensor row in flight at once, plus a quarter for the regions' growth steps."""
    in_flight = 2 * max_batch * largest_row_bytes
    return int(python_instances * (shm_default_bytes + in_flight) * 1.25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the environment's folder (with --archive, also OUT.tar.gz)")
    parser.add_argument("--gpu", action="store_true", help=f"add CuPy for the GPU path ({CUPY})")
    parser.add_argument(
        "--cupy", default=CUPY, help="the CuPy requirement (cupy-cuda13x for CUDA 13 drivers)"
    )
    parser.add_argument("--text", action="store_true", help=f"add {TOKENIZERS} for text models")
    parser.add_argument("--images", action="store_true", help=f"add {PILLOW} for image models (IMAGE_BYTES)")
    parser.add_argument(
        "--requirement", action="append", default=[], help="a further requirement (repeatable)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter to build it with (the stub's)"
    )
    parser.add_argument("--archive", action="store_true", help="also pack OUT.tar.gz")
    parser.add_argument("--pip-arg", action="append", default=[], help="passed to pip install (repeatable)")
    args = parser.parse_args(argv)
    requirements = [*server_requirements(args.gpu, args.text, args.cupy, args.images), *args.requirement]
    made = create_execution_env(args.out, requirements, args.python, args.pip_arg, args.archive)
    print(f"{made}: {', '.join(requirements)} + offramp.backend, offramp.kernels")
    print(
        'config.pbtxt: parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "<as the server sees it>" } }'
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
