"""The command line: the main job, compare, info, help and errors."""
import subprocess
import sys

import pytest
from PIL import Image

from _cli_errors import cli_error
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


# ------------------------------------------------------------------ one-line errors, exit code 2
_err = cli_error  # exit code 2, one stderr line, no traceback (tests/_cli_errors.py)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cmd", [["sample"], ["compare"], ["generate", "--seeds", "0-3"], ["fid", "x", "--ref", "y"],
                                 ["sweep"], ["train"]])
def test_device_cuda_without_cuda_is_one_line(capsys, cmd):
    err = _err(capsys, cmd + ["--device", "cuda"])
    assert "CUDA is not available" in err and "--device cpu" in err


def _bad_checkpoints(tmp_path):
    import torch

    good = (__import__("psld_fast").learned.learned_path("ring2d")).read_bytes()
    files = {"empty": b"", "truncated": good[:3000], "random": bytes(range(256)) * 8, "json": b'{"a": 1}\n'}
    for name, data in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(data)
    (tmp_path / "dir.ckpt").mkdir()
    torch.save({"x": object()}, tmp_path / "objects.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "nosd.ckpt")
    return [*files, "dir", "objects", "tensor", "nosd", "missing"]


def test_bad_checkpoints_are_one_line_naming_the_file(tmp_path, capsys):
    for name in _bad_checkpoints(tmp_path):
        path = tmp_path / f"{name}.ckpt"
        err = _err(capsys, ["sample", "--checkpoint", str(path), "--no-progress", "--out", str(tmp_path / "o.npz")])
        assert str(path) in err, err
        assert "weights_only" not in err and "add_safe_globals" not in err, err
    assert not (tmp_path / "o.npz").exists()


def test_seed_parsing_bounds_and_negative_ranges(capsys):
    import time

    assert parse_seeds("-5--2") == [-5, -4, -3, -2]
    assert parse_seeds(" 3 , 7-8") == [3, 7, 8]
    t0 = time.perf_counter()
    err = _err(capsys, ["sample", "--seeds", "0-9223372036854775806"])  # never expanded into a list
    assert time.perf_counter() - t0 < 5 and "at most 10,000,000" in err
    err = _err(capsys, ["sample", "--seeds", "9223372036854775808"])
    assert "outside the int64 range" in err
    err = _err(capsys, ["sample", "--seeds", "1-x"])
    assert "bad seed list" in err


def test_negative_seed_range_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "neg.npz"
    assert main(["sample", "--model", "gaussian", "--seeds", "-5--2", "--nfe", "11", "--no-progress",
                 "--out", str(out)]) == 0
    import numpy as np

    assert np.load(out)["seeds"].tolist() == [-5, -4, -3, -2]


def test_sample_out_and_n_checked_before_sampling(tmp_path, capsys):
    err = _err(capsys, ["sample", "--out", str(tmp_path / "x.jpg"), "--no-progress"])
    assert "unsupported suffix '.jpg'" in err and ".png, .npz" in err
    err = _err(capsys, ["sample", "--out", str(tmp_path), "--no-progress"])
    assert "is an existing folder" in err
    assert not list(tmp_path.iterdir())
    err = _err(capsys, ["sample", "-n", "8", "--seeds", "0-3", "--no-progress", "--out", str(tmp_path / "a.png")])
    assert "-n 8 and --seeds (4 seeds) disagree" in err
    err = _err(capsys, ["sample", "--model", "ring2d", "--out", str(tmp_path / "r.png"), "--no-progress"])
    assert "not images" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _err(capsys, ["sample", "--out", str(blocker / "a.png"), "--no-progress"])
    assert "is an existing file, not a folder" in err


def test_help_texts_have_no_doubled_percent(capsys):
    for cmd in ("compare", "sweep"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "95% CI" in text and "%%" not in text, text


def test_compare_on_learned_digits_names_its_reference(capsys):
    assert main(["compare", "--model", "learned-digits", "--samplers", "em", "--nfes", "11", "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert "sliced W2 to the 1797 training digits" in out and "exact data law" not in out


def test_every_subcommand_takes_threads(capsys):
    import torch

    for cmd in ("sample", "compare", "info", "generate", "fid", "sweep", "train"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--threads" in capsys.readouterr().out, cmd
    before = torch.get_num_threads()
    try:
        assert main(["info", "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "--threads 0: give an integer >= 1" in _err(capsys, ["info", "--threads", "0"])


def test_default_threads_do_not_oversubscribe(monkeypatch):
    import os

    from psld_fast import cli_common

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 1.0, 1.0))
    assert cli_common.default_threads() == 1  # 2 cores, one busy with another job
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 1.0, 1.0))
    assert cli_common.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    # at most torch's own default (read at import), not the count an earlier command set
    assert cli_common.default_threads() == min(2, __import__("psld_fast.guards").guards._TORCH_DEFAULT_THREADS)


def test_budget_and_divergence_on_the_command_line(tmp_path, capsys):
    import warnings

    for cmd in (["sample", "--out", str(tmp_path / "a.png")], ["generate", "--seeds", "0-1", "--out", str(tmp_path / "g")],
                ["sweep", "--model", "ring2d", "--nfes", "4", "--out", str(tmp_path / "s")]):
        err = _err(capsys, cmd + ["--nfe" if cmd[0] != "sweep" else "--nfes", "1000000000", "--no-progress"])
        assert "above the limit of 100000" in err, err
    err = _err(capsys, ["sample", "-n", "1000000000000", "--batch-size", "4", "--no-progress",
                        "--out", str(tmp_path / "b.png")])
    assert "GiB are available" in err
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["sample", "--nfe", "5", "-n", "8", "--coupling", "sequential", "--no-progress", "--no-quality",
                     "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert "psld-fast sample: warning: sampling left the data range" in err and "Traceback" not in err


def test_unwritable_output_folder_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import os

    from psld_fast import cli_common

    monkeypatch.setattr(cli_common.os, "access", lambda path, mode: False)  # as a non-root user on a read-only dir
    monkeypatch.setattr("psld_fast.cli.sample", lambda *a, **k: pytest.fail("sampled before checking --out"))
    err = _err(capsys, ["sample", "--out", str(tmp_path / "sub" / "a.png"), "--no-progress"])
    assert f"{tmp_path} is not writable" in err
    assert os.path.isdir(tmp_path)
