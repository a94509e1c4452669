"""psld-fast sweep: CSV/Markdown/PNG outputs, resume after interruption, refused config changes."""
import csv
from pathlib import Path

import numpy as np
import pytest

import psld_fast as pf
from psld_fast.sweep import FIELDS, plot_sweep, read_rows, sweep

GRID = dict(samplers=["em", "reduced_oba"], nfes=[4, 6], lambdas=[0.5, None])
FAST = dict(num_samples=64, n_boot=10, progress=False)


@pytest.fixture(scope="module")
def ring():
    return pf.get_preset("ring2d")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_grid_writes_csv_markdown_plot_and_resumes(tmp_path, ring):
    new = []
    rows = sweep(ring, tmp_path, **GRID, **FAST, on_cell=new.append)
    assert len(rows) == len(new) == 8 and all(r["status"] == "ok" for r in rows)
    on_disk = _rows(tmp_path / "sweep.csv")
    assert len(on_disk) == 8 and list(on_disk[0]) == FIELDS
    assert {r["lambda_s"] for r in on_disk} == {"0.5", "default"} and {r["metric"] for r in on_disk} == {"sw2"}
    r0 = on_disk[0]
    assert float(r0["lo"]) <= float(r0["value"]) <= float(r0["hi"]) and r0["nfe_spent"] == r0["nfe"]
    md = (tmp_path / "sweep.md").read_text()
    assert "## Best lambda_s per NFE" in md and "| em |" in md and "| reduced_oba |" in md and "NFE 6" in md
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "sweep.png").convert("RGB"))
    assert img.shape[1] > 700 and img.shape[0] > 400
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # the two series (matplotlib C0, C1)
    # resume: the finished cells are skipped, a grid extension computes only the new cells
    new.clear()
    rows = sweep(ring, tmp_path, **{**GRID, "nfes": [4, 6, 8]}, **FAST, on_cell=new.append)
    assert len(new) == 4 and {r["nfe"] for r in new} == {"8"} and len(rows) == 12
    new.clear()
    sweep(ring, tmp_path, **{**GRID, "nfes": [4, 6, 8]}, **FAST, on_cell=new.append)
    assert new == [] and len(_rows(tmp_path / "sweep.csv")) == 12


def test_a_torn_last_line_is_dropped_and_its_cell_recomputed(tmp_path, ring):
    grid = dict(samplers=["em"], nfes=[4, 6], lambdas=[None])
    sweep(ring, tmp_path, **grid, **FAST)
    path = tmp_path / "sweep.csv"
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    last = lines[-1]
    path.write_text("".join(lines[:-1]) + last[: len(last) // 2])  # a kill in the middle of the append
    assert len(read_rows(path)) == 1 and path.read_text().endswith("\n")
    new = []
    sweep(ring, tmp_path, **grid, **FAST, on_cell=new.append)
    assert len(new) == 1 and new[0]["nfe"] == "6"
    assert path.read_text() == text.replace(last, "") + path.read_text().splitlines(keepends=True)[-1]
    assert len(_rows(path)) == 2


def test_another_configuration_is_refused_unless_forced(tmp_path, ring):
    grid = dict(samplers=["em"], nfes=[8], lambdas=[None])
    sweep(ring, tmp_path, **grid, **FAST)
    with pytest.raises(ValueError, match="another configuration.*num_samples"):
        sweep(ring, tmp_path, **grid, **{**FAST, "num_samples": 32})
    rows = sweep(ring, tmp_path, **grid, **{**FAST, "num_samples": 32}, force=True)
    assert len(rows) == 1 and rows[0]["n"] == "32"
    assert list(tmp_path.glob("sweep.csv.replaced-*"))


def test_bad_metric_requests_are_clear(tmp_path, ring):
    with pytest.raises(ValueError, match="needs a reference"):
        sweep(ring, tmp_path, ["em"], [8], metric="fid", **FAST)
    with pytest.raises(ValueError, match="unknown sampler"):
        sweep(ring, tmp_path, ["nope"], [8], **FAST)


def test_fid_metric_streams_samples_through_the_extractor(tmp_path):
    from psld_fast.fid import RANDOM_CONV
    from psld_fast.images import save_png

    digits = pf.get_preset("digits")
    ref = tmp_path / "ref"
    ref.mkdir()
    import torch

    for i, x in enumerate(digits.sample_data(24, generator=torch.Generator().manual_seed(1)).float()):
        save_png(x.clamp(-1, 1), ref / f"{i:03d}.png")
    rows = sweep(digits, tmp_path / "out", ["reduced_oba"], [4, 6], [None], metric="fid", reference=ref,
                 extractor=RANDOM_CONV, num_samples=24, batch_size=16, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(float(r["value"]) > 0 for r in rows)
    assert rows[0]["metric"] == "fid" and rows[0]["lo"] == ""
    assert (tmp_path / "out" / "sweep.png").is_file()


def test_cli_sweep_and_a_plot_with_gaps(tmp_path, capsys):
    from psld_fast.cli import main

    out = tmp_path / "cli"
    assert main(["sweep", "--model", "ring2d", "--samplers", "em", "--nfes", "4", "--lambdas", "default,0.5",
                 "-n", "64", "--n-boot", "10", "--out", str(out), "--no-progress"]) == 0
    assert len(_rows(out / "sweep.csv")) == 2 and (out / "sweep.md").is_file() and (out / "sweep.png").is_file()
    rows = [dict(r, status="diverged", value="nan") if i == 0 else r for i, r in enumerate(_rows(out / "sweep.csv"))]
    plot_sweep(tmp_path / "gaps.png", rows)
    plot_sweep(tmp_path / "empty.png", [dict(rows[0])])
    assert Path(tmp_path / "gaps.png").stat().st_size > 0 and Path(tmp_path / "empty.png").stat().st_size > 0
    from PIL import Image

    assert Image.open(out / "sweep.png").size[0] > 600  # a real matplotlib figure, not a pixel-font sketch
    plot_sweep(tmp_path / "vector.svg", rows)
    assert (tmp_path / "vector.svg").read_text().lstrip().startswith("<?xml")


def test_without_matplotlib_tables_are_written_and_the_plot_step_says_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    from psld_fast import sweep as S
    from psld_fast.plotting import PlotUnavailable

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(S, "_plot_note_said", [])
    ring = pf.get_preset("ring2d")
    sweep(ring, tmp_path, ["em"], [4, 6], [None], num_samples=32, n_boot=5, progress=False)
    assert (tmp_path / "sweep.csv").is_file() and (tmp_path / "sweep.md").is_file()
    assert not (tmp_path / "sweep.png").exists()
    err = capsys.readouterr().err
    assert err.count("sweep.png not drawn") == 1 and "pip install 'psld-fast[plot]'" in err
    with pytest.raises(PlotUnavailable, match="matplotlib"):
        plot_sweep(tmp_path / "x.png", _rows(tmp_path / "sweep.csv"))


def test_a_second_sweep_into_a_busy_folder_is_refused(tmp_path):
    from psld_fast.generate import FolderBusy, FolderLock

    with FolderLock(tmp_path, "test sweep"):
        with pytest.raises(FolderBusy, match="in use by another run"):
            sweep(pf.get_preset("ring2d"), tmp_path, ["em"], [4], [None], **FAST)
    assert not (tmp_path / "sweep.csv").exists()


def test_reading_axes_grid_every_knob_and_skip_cells_where_it_does_not_apply(tmp_path, ring):
    """split, coupling and ci_lambda are grid axes; joint coupling only for reduced samplers and
    ci_lambda only for the conjugate ones; the cells record their reading and equal a direct sample()."""
    rows = sweep(ring, tmp_path, samplers=["em", "reduced_oba", "ci_ddim"], nfes=[6], lambdas=[None],
                 splits=["additive", "ou"], couplings=["sequential", "joint"], ci_lambdas=[None, 0.05], **FAST)
    got = {(r["sampler"], r["split"], r["coupling"], r["ci_lambda"]) for r in rows}
    expected = {("em", s, "sequential", "default") for s in ("additive", "ou")}
    expected |= {("reduced_oba", s, c, "default") for s in ("additive", "ou") for c in ("sequential", "joint")}
    expected |= {("ci_ddim", s, "sequential", ci) for s in ("additive", "ou") for ci in ("default", "0.05")}
    assert got == expected
    md = (tmp_path / "sweep.md").read_text()
    assert "| split | coupling | ci_lambda |" in md and "coupling=joint" in md
    cell = next(r for r in rows if r["sampler"] == "reduced_oba" and r["split"] == "additive" and r["coupling"] == "joint")
    from psld_fast.metrics import sliced_wasserstein_ci

    res = pf.sample(ring, 64, sampler="reduced_oba", nfe=6, split="additive", coupling="joint", seeds=np.arange(64),
                    progress=False)
    ref = ring.sample_data(1024, generator=__import__("torch").Generator().manual_seed(12345)).double()
    assert float(cell["value"]) == pytest.approx(sliced_wasserstein_ci(res.x.double(), ref, seed=0, n_boot=10)["value"],
                                                 rel=1e-4)
    with pytest.raises(ValueError, match="unknown coupling 'both'"):
        sweep(ring, tmp_path / "x", samplers=["reduced_oba"], nfes=[6], couplings=["both"], **FAST)
