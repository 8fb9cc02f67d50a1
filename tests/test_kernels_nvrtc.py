"""Compile the kernel sources with NVRTC for sm_80, sm_90 and sm_100; no GPU or driver needed.

Each source must compile for each architecture with every expected entry point in ptxas' report,
and no entry point may spill registers or use a stack frame: local memory would slow kernels that
should be bound by their global-memory traffic. The compile is ``compile_kernels``, the one the GPU
path loads, so its options (no flush-to-zero) are checked here too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from offramp.kernels.cuda import (
    COMPACT_SOURCE,
    CONFIDENCE_SOURCE,
    ENTRY_POINTS,
    compile_kernels,
    load_pip_nvrtc,
)

nvrtc = pytest.importorskip(
    "cupy_backends.cuda.libs.nvrtc", reason="CuPy (cupy-cuda13x) is not installed, so no NVRTC bindings"
)

ARCHITECTURES = ("sm_80", "sm_90", "sm_100")
SOURCES = (CONFIDENCE_SOURCE, COMPACT_SOURCE)

# ptxas -v, per entry point:
#   ptxas info    : Function properties for NAME
#   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 32 registers, used 0 barriers, ...
_FUNCTION_PROPERTIES = re.compile(
    r"Function properties for (?P<name>\w+)\s+ptxas\s+\.\s+(?P<stack>\d+) bytes stack frame, "
    r"(?P<spill_stores>\d+) bytes spill stores, (?P<spill_loads>\d+) bytes spill loads\s+"
    r"ptxas info\s+: Used (?P<registers>\d+) registers"
)


@pytest.fixture(scope="module", autouse=True)
def nvrtc_library() -> None:
    load_pip_nvrtc()
    try:
        nvrtc.getVersion()
    except Exception as error:  # CuPy raises RuntimeError or OSError depending on what is missing
        pytest.skip(f"no loadable NVRTC library (install nvidia-cuda-nvrtc==13.0.88): {error}")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda source: source.name)
def test_compiles_without_spills_or_stack(source: Path, architecture: str) -> None:
    compiled = compile_kernels(source, architecture, ["-Xptxas=-v"])
    assert compiled.cubin[:4] == b"\x7fELF"

    reports = {match["name"]: match for match in _FUNCTION_PROPERTIES.finditer(compiled.log)}
    expected = {name for name, defined_in in ENTRY_POINTS.items() if defined_in == source}
    assert set(reports) == expected, compiled.log
    for name, report in reports.items():
        summary = f"{name} on {architecture}: {report.group(0)!r}"
        assert report["spill_stores"] == "0" and report["spill_loads"] == "0", summary
        assert report["stack"] == "0", summary


def test_widest_row_copy_moves_16_bytes_per_access() -> None:
    """The 16-byte copy kernels must become 128-bit loads and stores, or the unit choice gains nothing."""
    ptx = compile_kernels(COMPACT_SOURCE, "sm_90").ptx.decode()
    for kernel in ("gather_rows_b16", "scatter_rows_b16"):
        body = ptx[ptx.index(f".entry {kernel}(") :].split(".entry", 2)[1]
        assert re.search(r"ld\.global(\.nc)?\.v4\.[ub]32|ld\.global(\.nc)?\.v2\.[ub]64", body), kernel
        assert re.search(r"st\.global\.v4\.[ub]32|st\.global\.v2\.[ub]64", body), kernel


# A PTX instruction with the .ftz modifier (setp.le.ftz.f32, add.ftz.f32, ...), predicated or not.
_FLUSHING_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z0-9]+(?:\.[a-z0-9]+)*\.ftz[.\w]*)", re.M)


@pytest.mark.parametrize("source", SOURCES, ids=lambda source: source.name)
def test_the_kernels_own_arithmetic_keeps_subnormals(source: Path) -> None:
    """No flush-to-zero: with it (CuPy's RawModule adds -ftz=true), every float comparison and sum
    flushes, and an exit decision against a subnormal threshold breaks the documented rule (seen on an
    H200). The one flushing instruction left is the hardware exp2 inside the math library's expf, which
    scales its argument into the normal range first."""
    ptx = compile_kernels(source, "sm_90").ptx.decode()
    flushing = set(_FLUSHING_INSTRUCTION.findall(ptx))
    assert flushing <= {"ex2.approx.ftz.f32"}, sorted(flushing)
    with_flush = compile_kernels(source, "sm_90", ["-ftz=true"]).ptx.decode()
    if source == CONFIDENCE_SOURCE:  # the pattern does see the flushing comparisons where they are
        assert any(op.startswith("setp.") for op in _FLUSHING_INSTRUCTION.findall(with_flush))
