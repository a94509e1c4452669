"""bench/gpu_check.sh on CPU: a failing, a timed-out and an interrupted step all reach the summary.

The steps are driven by a fake ``PYTHON`` (a shell script) so nothing is built or installed and
each case takes seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _fake_python(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fakepy"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def _env(tmp_path, python, steps, deadline=60):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, OUT=str(out), PYTHON=python, PSLD_GPU_CHECK_STEPS=steps,
               PSLD_GPU_CHECK_DEADLINE=str(deadline))
    return env, out


def _summary(out: Path) -> dict:
    data = json.loads((out / "gpu_check_summary.json").read_text())
    tsv = (out / "gpu_check_summary.tsv").read_text().splitlines()
    assert tsv[0] == "step\tstatus\tseconds\tnote"
    rows = {line.split("\t")[0]: line.split("\t")[1] for line in tsv[1:]}
    assert rows == {s["name"]: s["status"] for s in data["steps"]}
    return data


def test_failing_step_is_reported_and_later_steps_still_run(tmp_path):
    python = _fake_python(tmp_path, 'echo "fake failure $*"; exit 3')
    env, out = _env(tmp_path, python, "env kernels no_such_step")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "gpu_check summary" in proc.stdout
    data = _summary(out)
    assert [s["name"] for s in data["steps"]] == ["env", "kernels", "no_such_step"]
    assert [s["status"] for s in data["steps"]] == ["FAIL", "FAIL", "FAIL"]
    assert "exit 3" in data["steps"][0]["note"] and "fake failure" in data["steps"][1]["note"]
    assert data["all_passed"] is False and data["deadline_s"] == 60
    assert (out / "kernels.log").read_text().startswith("fake failure")


def test_deadline_times_out_a_step_and_the_rest_are_not_run(tmp_path):
    python = _fake_python(tmp_path, "sleep 30")
    env, out = _env(tmp_path, python, "env kernels", deadline=9)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 20, "the overall deadline was not enforced"
    assert proc.returncode == 1
    data = _summary(out)
    assert [s["status"] for s in data["steps"]] == ["TIMEOUT", "NOT RUN"]
    assert "deadline" in data["steps"][1]["note"]


def test_summary_printed_when_killed_from_outside(tmp_path):
    python = _fake_python(tmp_path, "sleep 60")
    env, out = _env(tmp_path, python, "env kernels tests_gpu")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "env.log"
        for _ in range(200):  # wait until the first step runs
            if log.exists():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - t0 < 10, "the interrupted script did not stop promptly"
    assert proc.returncode == 143
    assert "gpu_check summary" in stdout
    data = _summary(out)
    assert [s["status"] for s in data["steps"]] == ["KILLED", "NOT RUN", "NOT RUN"]
