"""psld-fast generate: files named by seed, identical for any batch size / world size, resumable."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import psld_fast as pf
from psld_fast.generate import ManifestMismatch, generate, png_path, seeds_to_spec

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2, 3, 4, 998, 999, 1000, 1001, 1002]
NFE = 6


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tree(root: Path) -> dict:
    """Every file under root (relative path -> bytes) except the manifests."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("manifest") and p.name != ".psld_fast.lock"}


@pytest.fixture(scope="module")
def digits():
    return pf.get_preset("digits")


@pytest.fixture(scope="module")
def ring():
    return pf.get_preset("ring2d")


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("ref_png")
    generate(digits, out, SEEDS, nfe=NFE, batch_size=4, progress=False)
    return _tree(out)


def test_png_layout_values_and_batch_size_invariance(tmp_path, digits, reference_png):
    s = generate(digits, tmp_path / "b3", SEEDS, nfe=NFE, batch_size=3, progress=False)
    assert s["written"] == len(SEEDS) and s["skipped"] == 0 and s["nfe"] == NFE
    generate(digits, tmp_path / "b5", SEEDS, nfe=NFE, batch_size=5, progress=False)
    t3, t5 = _tree(tmp_path / "b3"), _tree(tmp_path / "b5")
    assert t3 == t5 == reference_png
    assert sorted(t3) == [f"000000/{s:06d}.png" for s in SEEDS[:7]] + [f"001000/{s:06d}.png" for s in SEEDS[7:]]
    assert png_path("o", 1234) == Path("o/001000/001234.png")
    # a file holds exactly the quantised sample of its seed
    from PIL import Image

    x = pf.sample(digits, 2, seeds=[999, 3], nfe=NFE, progress=False).x
    from psld_fast.images import to_uint8

    want = to_uint8(x.clamp(-1, 1))
    got = np.asarray(Image.open(io.BytesIO(t3["000000/000999.png"])))
    assert got.shape == (16, 16) and np.array_equal(got, want[0, 0].numpy())
    man = json.loads((tmp_path / "b3" / "manifest.json").read_text())
    assert man["config"]["sampler"]["nfe"] == NFE and man["seeds"]["spec"] == "0-4,998-1002" and "seeds" not in man["config"]
    assert {"psld_fast", "torch", "python"} <= set(man["environment"]["versions"]) and man["environment"]["device"]


def test_npz_shards_any_batch_size(tmp_path, ring):
    seeds = list(range(25))
    generate(ring, tmp_path / "a", seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=3, progress=False)
    generate(ring, tmp_path / "b", seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=7, progress=False)
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert ta == tb and sorted(ta) == ["000000.npz", "000010.npz", "000020.npz"]
    ref = pf.sample(ring, 25, seeds=seeds, nfe=NFE, progress=False).x
    with np.load(tmp_path / "a" / "000020.npz") as z:
        assert z["x"].dtype == np.float32 and z["x"].shape == (5, 2)
        assert np.array_equal(z["seeds"], np.arange(20, 25))
        assert np.array_equal(z["x"], ref[20:].numpy())


def test_png_needs_an_image_model(tmp_path, ring):
    with pytest.raises(ValueError, match="--format npz"):
        generate(ring, tmp_path, [0, 1], nfe=NFE, progress=False)


class _Crash(RuntimeError):
    pass


def _crash_after(k):
    def hook(info):
        if info["batch"] + 1 >= k:
            raise _Crash(f"simulated crash after batch {info['batch']}")
    return hook


def test_resume_png_after_a_crash(tmp_path, digits, reference_png):
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        generate(digits, out, SEEDS, nfe=NFE, batch_size=3, progress=False, after_batch=_crash_after(2))
    assert len(_tree(out)) == 6
    stale = out / "000000" / ".000007.png.x1y2.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"partial")
    s = generate(digits, out, SEEDS, nfe=NFE, batch_size=3, progress=False)
    assert (s["written"], s["skipped"], s["removed_temp_files"]) == (4, 6, 1)
    assert _tree(out) == reference_png and not list(out.rglob("*.tmp"))
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert len(runs) == 2 and runs[-1]["written"] == 4 and "finished" not in runs[0]


def test_resume_npz_after_a_crash(tmp_path, ring):
    seeds = list(range(25))
    ref = tmp_path / "ref"
    generate(ring, ref, seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=4, progress=False)
    out = tmp_path / "run"
    with pytest.raises(_Crash):  # batches 0-3, 4-7, 8-9 (shard 0 written), 10-13 (crash)
        generate(ring, out, seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=4, progress=False,
                 after_batch=_crash_after(4))
    assert sorted(_tree(out)) == ["000000.npz"]
    s = generate(ring, out, seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=4, progress=False)
    assert (s["written"], s["skipped"]) == (15, 10)
    assert _tree(out) == _tree(ref)


def test_other_configuration_refused_unless_forced(tmp_path, digits, capsys):
    out = tmp_path / "run"
    generate(digits, out, SEEDS[:3], nfe=NFE, progress=False)
    with pytest.raises(ManifestMismatch, match=r"another configuration.*nfe.*--force"):
        generate(digits, out, SEEDS[:3], nfe=NFE + 2, progress=False)
    from psld_fast.cli import main

    rc = main(["generate", "--model", "digits", "--seeds", "0-2", "--nfe", str(NFE + 2), "--out", str(out),
               "--no-progress"])
    assert rc == 2 and "another configuration" in capsys.readouterr().err
    s = generate(digits, out, SEEDS[:2], nfe=NFE + 2, progress=False, force=True)
    # --force never leaves the other configuration's files under the new manifest
    assert (s["written"], s["skipped"]) == (2, 0)
    assert sorted(_tree(out)) == ["000000/000000.png", "000000/000001.png"]
    assert list(out.glob("manifest.replaced-*.json"))
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["sampler"]["nfe"] == NFE + 2 and man["seeds"]["spec"] == "0-1"
    fresh = tmp_path / "fresh"
    generate(digits, fresh, SEEDS[:2], nfe=NFE + 2, progress=False)
    assert _tree(out) == _tree(fresh)


def test_files_without_manifest_refused_unless_forced(tmp_path, digits):
    out = tmp_path / "run"
    generate(digits, out, SEEDS[:3], nfe=NFE, progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(ManifestMismatch, match="no manifest.json"):
        generate(digits, out, SEEDS[:3], nfe=NFE, progress=False)
    s = generate(digits, out, SEEDS[:3], nfe=NFE, progress=False, force=True)
    assert s["written"] == 3


def test_extending_or_subsetting_seeds_writes_only_what_is_missing(tmp_path, digits, reference_png):
    out = tmp_path / "run"
    assert generate(digits, out, SEEDS[:5], nfe=NFE, progress=False)["written"] == 5
    s = generate(digits, out, SEEDS, nfe=NFE, progress=False)
    assert (s["written"], s["skipped"]) == (5, 5)
    assert generate(digits, out, SEEDS[2:4], nfe=NFE, progress=False)["written"] == 0
    assert _tree(out) == reference_png
    man = json.loads((out / "manifest.json").read_text())
    assert man["seeds"]["spec"] == seeds_to_spec(SEEDS) and man["seeds"]["count"] == len(SEEDS)
    assert [r["seeds"]["spec"] for r in man["runs"]] == ["0-4", seeds_to_spec(SEEDS), "2-3"]


def test_extending_npz_shards_appends_the_missing_seeds(tmp_path, ring):
    ref = tmp_path / "ref"
    generate(ring, ref, list(range(15)), fmt="npz", shard_size=10, nfe=NFE, progress=False)
    out = tmp_path / "run"
    generate(ring, out, list(range(5)), fmt="npz", shard_size=10, nfe=NFE, progress=False)
    s = generate(ring, out, list(range(15)), fmt="npz", shard_size=10, nfe=NFE, progress=False)
    assert (s["written"], s["skipped"]) == (10, 5)
    for name in ("000000.npz", "000010.npz"):
        a, b = np.load(out / name), np.load(ref / name)
        assert a["seeds"].tolist() == b["seeds"].tolist() and np.array_equal(a["x"], b["x"])
    assert json.loads((out / "manifest.json").read_text())["seeds"]["spec"] == "0-14"


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, digits, capsys):
    from psld_fast.cli import main
    from psld_fast.generate import FolderBusy, FolderLock

    out = tmp_path / "run"
    with FolderLock(out, "test run"):
        with pytest.raises(FolderBusy, match=r"in use by another run \(test run, pid \d+"):
            generate(digits, out, SEEDS[:2], nfe=NFE, progress=False)
        assert main(["generate", "--model", "digits", "--seeds", "0-1", "--nfe", str(NFE), "--out", str(out),
                     "--no-progress"]) == 2
        assert "is in use by another run (test run" in capsys.readouterr().err
        assert not (out / "manifest.json").exists()
    assert generate(digits, out, SEEDS[:2], nfe=NFE, progress=False)["written"] == 2  # released


def test_output_folder_that_is_a_file(tmp_path, digits, capsys):
    from psld_fast.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["generate", "--model", "digits", "--seeds", "0-1", "--nfe", str(NFE), "--out", str(f),
                 "--no-progress"]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_seeds_to_spec():
    assert seeds_to_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    from psld_fast.cli import parse_seeds

    assert parse_seeds(seeds_to_spec(SEEDS)) == SEEDS


def test_two_gloo_processes_write_the_same_files(tmp_path, reference_png):
    """torchrun with 2 CPU processes (gloo) through the CLI: byte-identical to one process."""
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "psld_fast", "generate", "--model", "digits", "--seeds", "0-4,998-1002", "--nfe", str(NFE),
           "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _tree(out) == reference_png
    assert r.stdout.count("samples    10 requested: 10 written") == 1  # the summary comes from rank 0 only
    man = json.loads((out / "manifest.json").read_text())
    assert man["environment"]["world_size"] == 2


def test_sigkill_then_rerun_completes_identically(tmp_path, reference_png):
    out = tmp_path / "killed"
    script = (
        "import time, psld_fast as pf\n"
        "from psld_fast.generate import generate\n"
        f"generate(pf.get_preset('digits'), {str(out)!r}, {SEEDS!r}, nfe={NFE}, batch_size=1, progress=False,\n"
        "         after_batch=lambda info: time.sleep(0.25))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.rglob("*.png"))) < 3:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    n_before = len(list(out.rglob("*.png")))
    assert 3 <= n_before < len(SEEDS)
    from psld_fast.cli import main

    assert main(["generate", "--model", "digits", "--seeds", "0-4,998-1002", "--nfe", str(NFE), "--out", str(out),
                 "--no-progress"]) == 0
    assert _tree(out) == reference_png and not list(out.rglob("*.tmp"))
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert runs[-1]["written"] == len(SEEDS) - n_before and runs[-1]["skipped"] == n_before


def test_a_diverging_run_warns_once_not_per_batch(tmp_path, digits):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(digits, tmp_path / "w", list(range(12)), nfe=5, coupling="sequential", batch_size=3, progress=False)
    data = [w for w in caught if "left the data range" in str(w.message)]
    assert len(data) == 1 and data[0].filename == __file__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(digits, tmp_path / "u", list(range(6)), nfe=5, split="additive", batch_size=3, progress=False)
    unstable = [w for w in caught if "friction unstable" in str(w.message)]
    assert len(unstable) == 1 and unstable[0].filename == __file__


def test_a_failing_rank_brings_the_others_down(tmp_path):
    """Two gloo processes (no torchrun to kill the survivor): rank 1 fails after its first batch;
    rank 0 must stop promptly with rank 1's error, not wait for the process group's timeout."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "fail"
    script = (
        "import os, psld_fast as pf\n"
        "from psld_fast.generate import generate\n"
        "def hook(info):\n"
        "    if info['rank'] == 1:\n"
        "        raise ValueError('simulated failure on rank 1')\n"
        f"generate(pf.get_preset('ring2d'), {str(out)!r}, list(range(40)), fmt='npz', shard_size=4, nfe={NFE},\n"
        "         batch_size=4, progress=False, device='cpu', after_batch=hook)\n")
    procs = []
    for rank in range(2):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode != 0 and "simulated failure on rank 1" in results[1][1]
    assert procs[0].returncode != 0, "rank 0 should fail too"
    assert "rank 1 failed: ValueError: simulated failure on rank 1" in results[0][1], results[0][1][-2000:]


# ------------------------------------------------------------- per-seed conditioning (issue 18)
class _Conditional(pf.EpsModel):
    """ring2d's exact eps shifted by a class- and scale-dependent offset: the labels show in the samples."""

    def __init__(self):
        ring = pf.get_preset("ring2d")
        super().__init__(net=None, sde=ring.sde, shape=ring.shape, name="conditional_ring")
        self.ring = ring

    def forward(self, u, tau, class_labels=None, scale=None):
        off = 0.3 * (class_labels.to(u.dtype) - 1.5)[:, None] * scale.to(u.dtype)
        return self.ring(u, tau) + off


def test_per_seed_extra_args_follow_their_seeds_and_resume_checks_them(tmp_path):
    model = _Conditional()
    seeds = list(range(13))
    labels = torch.tensor([s % 4 for s in seeds])
    kw = dict(fmt="npz", shard_size=5, nfe=NFE, progress=False)
    extra = {"class_labels": labels, "scale": torch.tensor([1.0])}
    ref = tmp_path / "ref"
    generate(model, ref, seeds, batch_size=3, extra_args=extra, **kw)
    other = tmp_path / "other"
    generate(model, other, seeds, batch_size=5, extra_args=extra, **kw)
    assert _tree(other) == _tree(ref)  # rows go with their seeds, whatever the batching
    with np.load(ref / "000000.npz") as z:
        for i, s in enumerate(z["seeds"].tolist()):
            one = pf.sample(model, 1, seeds=[s], nfe=NFE, progress=False,
                            extra_args={"class_labels": labels[s:s + 1], "scale": torch.tensor([1.0])})
            assert np.array_equal(z["x"][i], one.x[0].numpy()), s
    plain = tmp_path / "plain"
    generate(model, plain, seeds, batch_size=3, extra_args={"class_labels": torch.zeros(13, dtype=torch.long),
                                                           "scale": torch.tensor([1.0])}, **kw)
    assert _tree(plain) != _tree(ref)
    # a crash, then the resume with the same rows: identical files
    run = tmp_path / "run"
    with pytest.raises(_Crash):
        generate(model, run, seeds, batch_size=3, extra_args=extra, after_batch=_crash_after(2), **kw)
    generate(model, run, seeds, batch_size=3, extra_args=extra, **kw)
    assert {k: v for k, v in _tree(run).items() if k != "conditioning.json"} == \
           {k: v for k, v in _tree(ref).items() if k != "conditioning.json"}
    # the seeds on disk would get other labels: refused, naming the file
    with pytest.raises(ManifestMismatch, match="conditioning.json"):
        generate(model, run, seeds + [13], batch_size=3, extra_args={
            "class_labels": torch.tensor([(s + 1) % 4 for s in seeds + [13]]), "scale": torch.tensor([1.0])}, **kw)
    # extending the seeds with rows that agree on the old ones: only the new seed is written
    more = torch.tensor([s % 4 for s in seeds + [13]])
    s = generate(model, run, seeds + [13], batch_size=3, extra_args={"class_labels": more,
                                                                    "scale": torch.tensor([1.0])}, **kw)
    assert (s["written"], s["skipped"]) == (1, 13)
    # a shared value is part of the configuration
    with pytest.raises(ManifestMismatch, match="another configuration"):
        generate(model, run, seeds, batch_size=3, extra_args={"class_labels": labels, "scale": torch.tensor([2.0])}, **kw)
    with pytest.raises(ValueError, match="seeds repeat"):
        generate(model, tmp_path / "dup", [0, 1, 1], extra_args={"class_labels": torch.tensor([0, 1, 2]),
                                                               "scale": torch.tensor([1.0])}, **kw)
    with pytest.raises(ValueError, match="one row per seed"):
        generate(model, tmp_path / "bad", seeds, extra_args={"class_labels": labels[:5], "scale": torch.tensor([1.0])}, **kw)


def test_a_manifest_from_before_a_knob_was_added_still_resumes(tmp_path, ring):
    """A manifest written before ``ms_variable`` existed lacks the key; for a sampler it does not
    apply to the run resumes (nothing is rewritten), while a real difference is still refused."""
    out = tmp_path / "run"
    seeds = list(range(6))
    generate(ring, out, seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=3, progress=False)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["config"]["sampler"]["ms_variable"] is None
    del manifest["config"]["sampler"]["ms_variable"]
    path.write_text(json.dumps(manifest))
    s = generate(ring, out, seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=3, progress=False)
    assert (s["written"], s["skipped"]) == (0, 6)
    manifest = json.loads(path.read_text())
    manifest["config"]["sampler"]["ms_variable"] = "tau"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch, match="ms_variable"):
        generate(ring, out, seeds, fmt="npz", shard_size=10, nfe=NFE, batch_size=3, progress=False)


def test_lifted_model_records_its_resolved_process(tmp_path):
    """A lifted model's manifest holds the process its start/end knobs resolved to (T, eps_end), so a
    rerun whose knobs (or library defaults) resolve elsewhere is refused instead of mixing samples."""
    import json

    import psld_fast as pf
    from psld_fast.generate import ManifestMismatch, generate

    gm = pf.get_preset("ring2d")
    den = gm.as_edm_denoiser()
    model = pf.DenoiserModel(den, gm.shape)
    out = tmp_path / "run"
    generate(model, out, range(4), fmt="npz", sampler="ei_2m", nfe=6, progress=False)
    proc = json.loads((out / "manifest.json").read_text())["config"]["process"]
    want = model.process_for("ei_2m")
    assert proc == {"T": want.T, "eps_end": want.eps_end}
    generate(model, out, range(6), fmt="npz", sampler="ei_2m", nfe=6, progress=False)  # same knobs: resumes
    with pytest.raises(ManifestMismatch, match="process"):
        generate(pf.DenoiserModel(den, gm.shape, end="process"), out, range(6), fmt="npz", sampler="ei_2m", nfe=6,
                 progress=False)
