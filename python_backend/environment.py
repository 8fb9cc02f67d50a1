"""The Python environment that Triton's Python-backend stubs run in.

A Python model's ``config.pbtxt`` names a virtualenv in the parameter ``EXECUTION_ENV_PATH``; the
stub then sources ``<env>/bin/activate`` and puts ``<env>/lib`` first on the library path. The stub
itself is linked against ``libpython3.11.so.1.0`` and would otherwise pick up whichever one the
system provides, whose build may not match the env's standard library (and, for a pyenv or
conda interpreter, may not even be the same patch release). Linking the interpreter's own shared
library into ``<env>/lib`` makes the stub load exactly the Python the env was built from.

Standard library only: ``build/execution_env.py`` loads this file by its path where it runs as a
plain script inside NVIDIA's Triton image, with no offramp installed.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

EXECUTION_ENV_PARAMETER = "EXECUTION_ENV_PATH"
# The sysconfig variables that say where an interpreter's shared libpython is.
LIBPYTHON_CONFIG_VARS = ("LIBDIR", "INSTSONAME", "LDLIBRARY", "Py_ENABLE_SHARED")


def shared_libpython(config_vars: Mapping[str, object]) -> Path | None:
    """The shared ``libpython`` of the interpreter whose sysconfig variables these are; None where it was
    built without ``--enable-shared`` or the library is not where they say."""
    libdir = config_vars.get("LIBDIR")
    if not libdir or not config_vars.get("Py_ENABLE_SHARED"):
        return None
    # INSTSONAME is the versioned soname the stub asks for (libpython3.11.so.1.0); LDLIBRARY is
    # the unversioned link name, a fallback for builds that do not record INSTSONAME.
    for name in (config_vars.get("INSTSONAME"), config_vars.get("LDLIBRARY")):
        candidate = Path(str(libdir), str(name))
        if name and candidate.exists():
            return candidate
    return None


def link_libpython(env: Path, library: Path, soname: str | None = None) -> Path:
    """Symlink ``library`` into ``<env>/lib/`` under ``soname`` (default: its own name) and return the
    link; calling this again is harmless, and a link to another library is repointed.

    Raises:
        RuntimeError: ``<env>/lib/<soname>`` exists and is not a link.
    """
    link = env / "lib" / (soname or library.name)
    if link.is_symlink() or link.exists():
        if link.resolve() == library.resolve():
            return link
        if not link.is_symlink():
            raise RuntimeError(f"{link} exists and is not a link to {library}; remove it")
        # A stale link (the venv was rebuilt on another interpreter): point it at this one.
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(library, link)
    except FileExistsError:  # Another process linked it between our check and now.
        if link.resolve() != library.resolve():
            raise
    return link


def interpreter_shared_library() -> Path:
    """Return the shared ``libpython`` of the running interpreter.

    Raises:
        RuntimeError: the interpreter was built without ``--enable-shared`` (no shared libpython
            to give the stub) or the library is not where ``sysconfig`` says.
    """
    library = shared_libpython(sysconfig.get_config_vars())
    if library is None:
        raise RuntimeError(
            f"{sys.executable} has no shared libpython (built without --enable-shared, or "
            f"{sysconfig.get_config_var('INSTSONAME')} missing from {sysconfig.get_config_var('LIBDIR')}); "
            "the Triton Python stub needs one. Use an interpreter built with --enable-shared "
            '(e.g. PYTHON_CONFIGURE_OPTS="--enable-shared" pyenv install 3.11).'
        )
    return library


def prepare_execution_env(env_dir: Path | None = None) -> Path:
    """Make ``env_dir`` usable as a Triton ``EXECUTION_ENV_PATH`` and return its absolute path.

    ``env_dir`` defaults to the running virtualenv (``sys.prefix``). The interpreter's shared
    libpython is symlinked into ``<env>/lib/`` under its soname; calling this again is harmless.
    The env must be a virtualenv of this same interpreter: the library linked is this one's.

    Raises:
        RuntimeError: the env has no ``bin/activate`` (the stub sources it), the interpreter has
            no shared libpython, or ``<env>/lib/<soname>`` exists and is something else.
    """
    env = Path(env_dir if env_dir is not None else sys.prefix).absolute()
    if not (env / "bin" / "activate").is_file():
        raise RuntimeError(
            f"{env} is not a virtualenv: the Triton Python stub sources {env / 'bin' / 'activate'}"
        )
    link_libpython(env, interpreter_shared_library(), sysconfig.get_config_var("INSTSONAME"))
    return env
