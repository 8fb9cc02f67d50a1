"""One libpython linker (``offramp.backend.environment``) for the project's venv and for the environment
``build/execution_env.py`` makes, also where that file runs as a plain script without offramp."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from offramp.backend.environment import link_libpython, shared_libpython
from offramp.build import execution_env

SCRIPT = Path(execution_env.__file__)
LIBRARY = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("INSTSONAME")


def test_the_shared_library_is_found_from_an_interpreters_config_vars():
    assert shared_libpython(sysconfig.get_config_vars()) == LIBRARY
    static = {"LIBDIR": str(LIBRARY.parent), "INSTSONAME": "libpython3.11.a", "Py_ENABLE_SHARED": 0}
    assert shared_libpython(static) is None


def test_a_link_is_made_once_repointed_when_stale_and_never_replaces_a_file(tmp_path: Path):
    link = link_libpython(tmp_path / "env", LIBRARY)
    assert link == tmp_path / "env" / "lib" / LIBRARY.name and link.resolve() == LIBRARY.resolve()
    assert link_libpython(tmp_path / "env", LIBRARY) == link
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere.so")
    assert link_libpython(tmp_path / "env", LIBRARY).resolve() == LIBRARY.resolve()
    link.unlink()
    link.write_text("")
    with pytest.raises(RuntimeError, match="not a link"):
        link_libpython(tmp_path / "env", LIBRARY)


def test_an_execution_env_gets_the_interpreters_library(tmp_path: Path):
    link = execution_env.link_interpreter_libpython(tmp_path / "env", sys.executable)
    assert link == tmp_path / "env" / "lib" / LIBRARY.name and link.resolve() == LIBRARY.resolve()


def test_the_script_links_without_offramp_installed(tmp_path: Path):
    """``python -S`` skips site-packages, where offramp is installed: as in NVIDIA's image, the script
    finds the linker by its file."""
    code = (
        "import runpy, sys; from pathlib import Path\n"
        "script = runpy.run_path(sys.argv[1])\n"
        "print(script['link_interpreter_libpython'](Path(sys.argv[2]), sys.executable))\n"
    )
    env = tmp_path / "env"
    found = subprocess.run(
        [sys.executable, "-S", "-c", code, str(SCRIPT), str(env)], check=True, capture_output=True, text=True
    )
    assert Path(found.stdout.strip()).resolve() == LIBRARY.resolve()
    offramp = subprocess.run([sys.executable, "-S", "-c", "import offramp"], capture_output=True, text=True)
    assert offramp.returncode != 0, "offramp importable without site-packages: the test proves nothing"
