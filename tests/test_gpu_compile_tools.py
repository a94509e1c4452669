"""The GPU compile checks that run without a GPU: the Triton AOT tool (smoke run) and the ptxas
report parser of .ci/check_cuda_build.sh."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import ptxas_report  # noqa: E402

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN9psld_fast12_GLOBAL__N_118affine_step_kernelIffLi4ELb1EEEvNS_16AffineStepParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN9psld_fast12_GLOBAL__N_118affine_step_kernelIffLi4ELb1EEEvNS_16AffineStepParamsE
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 58 registers, used 0 barriers, 32 bytes cumulative stack size, 464 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN9psld_fast12_GLOBAL__N_118affine_step_kernelIffLi1ELb0EEEvNS_16AffineStepParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN9psld_fast12_GLOBAL__N_118affine_step_kernelIffLi1ELb0EEEvNS_16AffineStepParamsE
    40 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 40 bytes cumulative stack size
"""


def test_ptxas_report_parses_registers_and_spills(tmp_path, capsys):
    rows = ptxas_report.parse_ptxas(PTXAS_LOG)
    assert [(r["arch"], r["regs"], r["stack"], r["spill_st"], r["spill_ld"]) for r in rows] == [
        ("sm_80", 58, 32, 0, 0), ("sm_90", 255, 40, 8, 4)]
    assert "affine_step_kernel<float, float, 4, true>" in rows[0]["name"]
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG)
    assert ptxas_report.main([str(log)]) == 1  # the spill fails the check
    out = capsys.readouterr().out
    assert "| sm_90 | float, float | 1 | false | 255 | 40 | 8/4 |" in out and "FAILED" in out
    log.write_text(PTXAS_LOG.split("ptxas info    : Compiling entry function '_ZN9psld_fast12_GLOBAL__N_118affine_step_kernelIffLi1")[0])
    assert ptxas_report.main([str(log)]) == 0


def test_triton_aot_smoke():
    """Two variants of the Triton kernel compiled for sm_90 through the whole pipeline (PTX, cubin)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_aot_check.py"), "--archs", "90",
                        "--first", "2", "--jobs", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "triton_aot_check: 2/2 ok" in r.stdout
