"""The command line: the main job, compare, info, help and errors."""
import subprocess
import sys

import pytest
from PIL import Image

from psld_fast.cli import main, parse_seeds


def test_main_job_writes_grid_and_prints_figures(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--out", str(out), "--no-progress", "-n", "16", "--nfe", "21"]) == 0
    text = capsys.readouterr().out
    for needle in ("NFE 21", "samples/s", "sliced W2 to the exact data law", "95% CI", str(out)):
        assert needle in text, text
    img = Image.open(out)
    assert img.size[0] > 16 * 4 and img.mode in ("L", "RGB")


def test_gaussian_quality_line_and_npz_output(tmp_path, capsys):
    out = tmp_path / "g.npz"
    assert main(["sample", "--model", "gaussian", "--out", str(out), "--no-progress", "--seeds", "0-31",
                 "--nfe", "21", "--sampler", "em"]) == 0
    text = capsys.readouterr().out
    assert "Gaussian W2 of the sample moments" in text and out.exists()


def test_compare_prints_a_table(capsys):
    assert main(["compare", "--model", "ring2d", "--samplers", "em,reduced_oba", "--nfes", "21,31",
                 "-n", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["sampler", "NFE", "21"]
    assert lines[2].startswith("em") and lines[3].startswith("reduced_oba") and "[" in lines[3]


def test_info_and_help(capsys):
    assert main(["info"]) == 0
    assert "auto backend on cpu" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--lambda-s" in capsys.readouterr().out


def test_errors_are_clear(capsys):
    assert main(["sample", "--nfe", "1", "--no-progress"]) == 2
    assert "nfe=1 is too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--sampler", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--seeds", "9-3"])
    assert "bad seed list" in capsys.readouterr().err


def test_parse_seeds():
    assert parse_seeds("0-3,10,-2") == [0, 1, 2, 3, 10, -2]


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "psld_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "psld-fast" in out.stdout and "sample" in out.stdout


def test_learned_models_selectable_by_name(tmp_path, capsys):
    assert main(["sample", "--model", "learned-ring2d", "--out", str(tmp_path / "r.npz"), "--no-progress",
                 "-n", "64", "--nfe", "21"]) == 0
    assert "sliced W2 to the exact data law" in capsys.readouterr().out
    assert main(["sample", "--model", "learned-digits", "--out", str(tmp_path / "d.png"), "--no-progress",
                 "-n", "4", "--nfe", "11"]) == 0
    assert "sliced W2 to the 1797 training digits" in capsys.readouterr().out
    assert (tmp_path / "d.png").exists()
