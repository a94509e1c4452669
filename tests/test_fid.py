"""psld-fast fid: streamed moments, FID/KID against direct computations, caching, torchrun, clear errors.

Features come from ``psld-random-conv``, a fixed random conv net registered with torch-fidelity's
``register_feature_extractor`` (no Inception weights are needed or available here).
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from psld_fast import fid as F
from psld_fast.images import save_png

N = 60
KID = dict(kid_subsets=10, kid_subset_size=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two image sets A (RGB) and B (greyscale, other law) as PNG trees, and A as npz shards."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    xa = np.clip(rng.normal(0.0, 0.5, (N, 3, 16, 16)), -1, 1).astype(np.float32)
    xb = np.clip(rng.normal(0.3, 0.4, (N, 1, 16, 16)) + np.linspace(-0.3, 0.3, 16), -1, 1).astype(np.float32)
    for name, x in (("A", xa), ("B", xb)):
        for i in range(N):
            p = root / name / f"{i // 25 * 25:06d}" / f"{i:06d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            save_png(x[i], p)
    (root / "A_npz").mkdir()
    for start in (0, 25, 50):
        np.savez(root / "A_npz" / f"{start:06d}.npz", x=xa[start:start + 25], seeds=np.arange(start, min(start + 25, N)))
    return root


@pytest.fixture(scope="module")
def ex():
    return F.make_extractor(F.RANDOM_CONV, device="cpu")


def _fid(samples, ref, tmp_path, **kw):
    kw = {**KID, **kw}
    return F.fid(samples, ref, extractor=F.RANDOM_CONV, device="cpu", cache_dir=tmp_path / "cache",
                 batch_size=kw.pop("batch_size", 16), progress=False, **kw)


def _direct_features(ex, folder):
    from PIL import Image

    files = sorted(Path(folder).rglob("*.png"))
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                        for f in files])
    return ex(imgs).numpy()


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(data, tmp_path):
    r = _fid(data / "A", data / "A", tmp_path)
    assert abs(r["fid"]) < 1e-6 and r["n"] == r["n_ref"] == N
    ab, ba = _fid(data / "A", data / "B", tmp_path)["fid"], _fid(data / "B", data / "A", tmp_path)["fid"]
    assert ab > 0.01 and abs(ab - ba) <= 1e-6 * ab
    assert any("not comparable" in w for w in r["warnings"])


def test_fid_and_kid_agree_with_direct_computations(data, tmp_path, ex):
    from scipy import linalg
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    r = _fid(data / "A", data / "B", tmp_path, batch_size=7)
    fa, fb = _direct_features(ex, data / "A"), _direct_features(ex, data / "B")
    mu1, mu2, s1, s2 = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    direct = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    tfid = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)["frechet_inception_distance"]
    assert r["fid"] == pytest.approx(direct, rel=1e-6) and r["fid"] == pytest.approx(tfid, rel=1e-6)
    kid = F.kernel_inception_distance(fa, fb, subsets=10, subset_size=30)
    assert r["kid_mean"] == pytest.approx(kid["kid_mean"], rel=1e-9, abs=1e-12)
    assert r["kid_std"] == pytest.approx(kid["kid_std"], rel=1e-9, abs=1e-12)


def test_kid_matches_torch_fidelity_and_the_textbook_estimator(ex, data):
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(50, 8)), rng.normal(0.2, 1.1, size=(40, 8))
    ours = F.kernel_inception_distance(f1, f2, subsets=7, subset_size=20, seed=5)
    theirs = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7, kid_subset_size=20,
                                    rng_seed=5, verbose=False)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-12)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-12)
    # one subset, written out: mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)
    x, y = f1[:6], f2[:6]

    def k(a, b):
        return (a @ b / a.size + 1.0) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    one = F.kernel_inception_distance(x, y, subsets=1, subset_size=m)  # a permutation of the whole sets
    assert one["kid_mean"] == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_fid_is_torch_fidelitys_formula_on_our_streamed_statistics(ex, data):
    """The metric arithmetic is torch-fidelity's (called, not re-implemented); the streamed float64
    moments equal numpy's mean/cov of the same features."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    fa, fb = _direct_features(ex, data / "A"), _direct_features(ex, data / "B")
    acc = F.FeatureAccumulator(fa.shape[1], torch.device("cpu"))
    for i in range(0, len(fa), 7):
        acc.add(torch.from_numpy(fa[i:i + 7]))
    st = acc.result()
    np.testing.assert_allclose(st["mu"], fa.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st["sigma"], np.cov(fa.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    mb, sb = fb.astype(np.float64).mean(0), np.cov(fb.astype(np.float64), rowvar=False)
    theirs = fid_statistics_to_metric({"mu": st["mu"], "sigma": st["sigma"]}, {"mu": mb, "sigma": sb}, False)
    assert F.frechet_distance(st["mu"], st["sigma"], mb, sb) == theirs["frechet_inception_distance"]
    with pytest.raises(ValueError, match="different dimensions"):
        F.frechet_distance(st["mu"], st["sigma"], mb[:3], sb[:3, :3])


def test_png_tree_and_npz_shards_give_the_same_statistics(data, ex):
    a = F.compute_statistics(data / "A", ex, progress=False, batch_size=11)
    b = F.compute_statistics(data / "A_npz", ex, progress=False, batch_size=16)
    assert a["n"] == b["n"] == N
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a["sigma"], b["sigma"], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(a["kid_features"], b["kid_features"], rtol=1e-12, atol=1e-14)


def test_reference_folder_statistics_are_cached_and_saved_stats_work(data, tmp_path):
    r1 = _fid(data / "A", data / "B", tmp_path, save_stats=tmp_path / "a_stats.npz")
    r2 = _fid(data / "A", data / "B", tmp_path)
    assert not r1["reference_cached"] and r2["reference_cached"] and Path(r2["reference_cache_file"]).is_file()
    assert r2["fid"] == r1["fid"] and r2["kid_mean"] == r1["kid_mean"]
    # a statistics file (mu, sigma, n, KID features) as the reference
    r3 = _fid(data / "B", tmp_path / "a_stats.npz", tmp_path)
    assert r3["fid"] == pytest.approx(r1["fid"], rel=1e-6) and r3["kid_mean"] is not None
    with np.load(tmp_path / "a_stats.npz") as z:
        np.savez(tmp_path / "mu_sigma.npz", mu=z["mu"], sigma=z["sigma"])
    r4 = _fid(data / "B", tmp_path / "mu_sigma.npz", tmp_path)
    assert r4["fid"] == pytest.approx(r1["fid"], rel=1e-6) and r4["kid_mean"] is None and "no features" in r4["kid_note"]


def test_subset_for_kid_is_bounded_and_world_size_independent():
    keep = F._kid_keep(1000, 100, 2020)
    assert len(keep) == 100 and np.all(np.diff(keep) > 0) and np.array_equal(keep, F._kid_keep(1000, 100, 2020))
    assert np.array_equal(F._kid_keep(50, 100, 0), np.arange(50))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fid_rank(rank, world, port, a, b, cache, out):
    """One rank of a 2-process gloo group (forked: torch and torch-fidelity are already imported)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    r = F.fid(a, b, extractor=F.RANDOM_CONV, device="cpu", cache_dir=cache, batch_size=16, progress=False, **KID)
    Path(f"{out}.{rank}").write_text(json.dumps(r))


def test_two_gloo_processes_give_the_single_process_numbers(data, tmp_path):
    """fid() in 2 processes (torch.multiprocessing, gloo): each rank reads half, moments all-reduced."""
    single = _fid(data / "A", data / "B", tmp_path)
    out = tmp_path / "dist.json"
    torch.multiprocessing.start_processes(_fid_rank, nprocs=2, start_method="fork", join=True,
                                          args=(2, _free_port(), str(data / "A"), str(data / "B"),
                                                str(tmp_path / "cache2"), str(out)))
    r0, r1 = (json.loads(Path(f"{out}.{k}").read_text()) for k in (0, 1))
    assert r0["world_size"] == 2 and r0["n"] == N and r0["fid"] == r1["fid"] and r0["kid_mean"] == r1["kid_mean"]
    assert r0["fid"] == pytest.approx(single["fid"], rel=1e-9)
    assert r0["kid_mean"] == pytest.approx(single["kid_mean"], rel=1e-9, abs=1e-12)


def test_cli_fid_with_a_random_conv_extractor(data, tmp_path, capsys):
    from psld_fast.cli import main

    out = tmp_path / "r.json"
    assert main(["fid", str(data / "A"), "--ref", str(data / "B"), "--extractor", F.RANDOM_CONV, "--device", "cpu",
                 "--kid-subsets", "10", "--kid-subset-size", "30", "--cache-dir", str(tmp_path / "c"),
                 "--json", str(out), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "FID " in cap.out and "KID " in cap.out and "not comparable" in cap.err
    assert json.loads(out.read_text())["n"] == N


def test_missing_inception_weights_say_what_file_is_needed(tmp_path, monkeypatch, data, capsys):
    monkeypatch.delenv(F.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(F.InceptionWeightsMissing) as e:
        F.resolve_inception_weights()
    msg = str(e.value)
    assert F.INCEPTION_FILE in msg and F.ENV_WEIGHTS in msg and "--inception-weights" in msg and "downloads nothing" in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        F.resolve_inception_weights(tmp_path / "nowhere.pth")
    monkeypatch.setenv(F.ENV_WEIGHTS, str(tmp_path / "env.pth"))
    with pytest.raises(F.InceptionWeightsMissing, match=f"env.pth.*{F.ENV_WEIGHTS}"):
        F.resolve_inception_weights()
    from psld_fast.cli import main

    monkeypatch.delenv(F.ENV_WEIGHTS)
    assert main(["fid", str(data / "A"), "--ref", str(data / "B"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert F.INCEPTION_FILE in err and "--inception-weights" in err


def test_torch_fidelity_imports_on_this_install():
    tf = F._import_torch_fidelity()
    assert hasattr(tf, "FeatureExtractorInceptionV3") and hasattr(tf, "register_feature_extractor")
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert F.INCEPTION in FEATURE_EXTRACTORS_REGISTRY and F.register_random_conv() in FEATURE_EXTRACTORS_REGISTRY


def test_inception_is_built_from_the_local_file_and_never_downloads(tmp_path, monkeypatch):
    """The real inception-v3-compat class, given a local file (random weights here: the genuine file is
    not available offline); a download attempt would fail the test."""
    F._import_torch_fidelity()
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    def no_download(*a, **k):
        raise AssertionError("tried to download the Inception weights")

    monkeypatch.setattr(inc, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    weights = tmp_path / F.INCEPTION_FILE
    torch.save({}, weights)
    monkeypatch.setenv(F.ENV_WEIGHTS, str(weights))
    ex = F.make_extractor(F.INCEPTION, device="cpu")
    assert ex.dim == 2048 and ex.feature == "2048" and ex.identity["weights"]["file"] == F.INCEPTION_FILE


def test_unwritable_cache_is_not_reported_as_cached(data, tmp_path, capsys):
    from psld_fast.cli import main

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would go")  # unwritable even for root
    assert main(["fid", str(data / "A"), "--ref", str(data / "B"), "--extractor", F.RANDOM_CONV, "--device", "cpu",
                 "--no-kid", "--cache-dir", str(blocker / "cache"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "FID " in cap.out and "cached in" not in cap.out and "were not cached" in cap.err


def test_unwritable_json_is_refused_before_the_work(data, tmp_path, capsys, monkeypatch):
    from psld_fast.cli import main

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setattr(F, "fid", lambda *a, **k: pytest.fail("fid ran although --json cannot be written"))
    for flag in ("--json", "--save-stats"):
        assert main(["fid", str(data / "A"), "--ref", str(data / "B"), "--extractor", F.RANDOM_CONV,
                     flag, str(blocker / "r.json"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and "is an existing file, not a folder" in err
