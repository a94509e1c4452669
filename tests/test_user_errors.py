"""What a new user hits (issue 20): errors that name the problem (one line, exit code 2 on the
command line), checks made before the expensive work, warnings on every sampling path, a clean
Ctrl-C and speed lines whose numbers agree."""
import re
import time
import warnings

import pytest
import torch

import psld_fast as pf
from psld_fast.checkpoint import CheckpointError, load_psld_checkpoint
from _cli_errors import cli_error
from psld_fast.cli import main


_err = cli_error  # exit code 2, one stderr line, no traceback (tests/_cli_errors.py)


# ------------------------------------------------------------------------ 1. truncated checkpoints
@pytest.fixture(scope="module")
def digits_bytes():
    from psld_fast.learned import learned_path

    return learned_path("digits").read_bytes()


@pytest.mark.parametrize("cut", [3000, 5000, 20000, 70000, 1_000_000])
def test_truncated_checkpoint_is_named_as_truncated(tmp_path, capsys, digits_bytes, cut):
    """Cut between ~4 KB and ~70 KB, torch's zip reader fails with a bare EINVAL OSError."""
    path = tmp_path / "t.ckpt"
    path.write_bytes(digits_bytes[:cut])
    err = _err(capsys, ["sample", "--checkpoint", str(path), "--no-progress", "--out", str(tmp_path / "o.png")])
    assert err == f"psld-fast sample: error: {path} is truncated or corrupt (not a complete torch.save archive)", err
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is truncated or corrupt")):
        load_psld_checkpoint(path)
    assert not (tmp_path / "o.png").exists()


# --------------------------------------------------------------- 3. training mode, every path
class _DropoutNet(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin, self.drop = torch.nn.Linear(width, width), torch.nn.Dropout(0.1)

    def forward(self, u, tau):
        return self.drop(self.lin(u))


def _dropout_model(shape=(2,)):
    net = _DropoutNet(2 * shape[0])
    return net, pf.EpsModel(net, shape=shape)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_training_mode_network_warns_on_the_cpu_eager_path(backend):
    net, model = _dropout_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pf.sample(model, 4, nfe=11, progress=False, backend=backend)
        pf.sample(model, 4, nfe=11, progress=False, backend=backend)  # once per network
    found = [w for w in caught if "training mode" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert "_DropoutNet" in str(found[0].message) and "net.eval()" in str(found[0].message)
    assert found[0].filename == __file__  # attributed to the caller's line
    net2, model2 = _dropout_model()
    net2.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pf.sample(model2, 4, nfe=11, progress=False, backend=backend)
    assert not [w for w in caught if "training mode" in str(w.message)]


# --------------------------------------------------------------- 4. train checks --out up front
def test_train_checks_its_output_folder_before_any_work(tmp_path, capsys, monkeypatch):
    from psld_fast import train as T

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the output folder was checked")

    monkeypatch.setattr(T, "make_data", no_data)
    blocker = tmp_path / "file"
    blocker.write_text("")
    t0 = time.perf_counter()
    err = _err(capsys, ["train", "--out", str(blocker / "run"), "--steps", "100000", "--no-progress"])
    assert "--out" in err and "is an existing file, not a folder" in err and time.perf_counter() - t0 < 5
    err = _err(capsys, ["train", "--out", "/proc/psld_fast_run", "--no-progress"])  # os.access says yes for root
    assert "/proc is not writable" in err, err
    with pytest.raises(ValueError, match="training output folder"):
        T.train(data="ring2d", out=str(blocker / "run"), steps=5, progress=False)
    err = _err(capsys, ["train", "--out", str(tmp_path / "ok"), "--export", str(blocker / "x.pt"), "--no-progress"])
    assert err.startswith("psld-fast train: error: --export"), err
    assert "--net" in _err(capsys, ["train", "--out", str(tmp_path / "ok"), "--net", "{hidden: 3}", "--no-progress"])
    assert not (tmp_path / "ok").exists()


# ------------------------------------------------------------ 6. GPU backends asked for on CPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_backend_on_cpu_says_how(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    missing = str(tmp_path / "missing.ckpt")  # checked before the model is loaded
    err = _err(capsys, ["sample", "--backend", "triton", "--checkpoint", missing])
    assert err.startswith("psld-fast sample: error: --backend triton:") and "TRITON_INTERPRET=1" in err, err
    err = _err(capsys, ["generate", "--backend", "cuda", "--seeds", "0-3", "--out", str(tmp_path / "g")])
    assert "--backend cuda:" in err and "CUDA is not available here" in err and "'cpu'" in err, err
    err = _err(capsys, ["sample", "--backend", "cpu", "--dtype", "float64"])
    assert "float64 runs on backend 'reference'" in err
    assert not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------------- 8. shapes
def test_sample_shapes_are_checked_before_the_network_runs():
    digits = pf.get_preset("digits")
    with pytest.raises(ValueError, match=r"shape=\(1, 8, 8\) does not fit this analytic model: its samples hold 256"):
        pf.sample(digits, 2, shape=(1, 8, 8), nfe=11, progress=False)
    assert pf.sample(digits, 2, shape=(256,), nfe=11, progress=False).x.shape == (2, 256)  # same size: fine
    for bad in [(-1, 8), (0, 8), (8, 0)]:
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            pf.EpsModel(lambda u, tau: u, shape=bad)
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            pf.sample(lambda u, tau: u, 2, shape=bad, nfe=11, progress=False)
    with pytest.raises(ValueError, match="tuple of ints"):
        pf.EpsModel(lambda u, tau: u, shape="ab")
    assert pf.EpsModel(lambda u, tau: u, shape=16).shape == (16,)


def test_network_failing_on_its_first_call_names_the_shapes():
    net = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match=r"first call, given u of shape \(2, 6\) \(a batch of samples of shape "
                                           r"\(3,\).*mat1 and mat2"):
        pf.sample(pf.EpsModel(lambda u, tau: net(u), shape=(3,)), 2, nfe=11, progress=False)


# ------------------------------------------------------------------------------ 9. speed line
def _fake_result(n, nfe, sampling, compile_s):
    return pf.SampleResult(x=torch.zeros(n, 2), m=torch.zeros(n, 2), nfe=nfe, seeds=torch.arange(n),
                           timings={"compile": compile_s, "sampling": sampling, "total": compile_s + sampling},
                           sampler="reduced_oba", backend="cpu",
                           program_info={"lambda_s": 1.0, "net_time": "start", "split": "additive",
                                         "coupling": "joint"})


@pytest.mark.parametrize("n,nfe,sampling,compile_s,rate", [(64, 50, 0.16, 0.42, "400.0"),
                                                           (1, 100000, 121.0, 0.5, "0.00826")])
def test_speed_line_rates_come_from_one_timing(tmp_path, capsys, monkeypatch, n, nfe, sampling, compile_s, rate):
    import psld_fast.cli as cli

    monkeypatch.setattr(cli, "sample", lambda *a, **k: _fake_result(n, nfe, sampling, compile_s))
    assert main(["sample", "--model", "ring2d", "-n", str(n), "--nfe", str(nfe), "--no-quality", "--no-progress",
                 "--out", str(tmp_path / "r.npz")]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("samples")][0]
    m = re.search(r"sampling ([\d.]+) s: ([\d.e+-]+) samples/s, ([\d.]+) ms per NFE", line)
    assert m is not None, line
    assert m.group(2) == rate, line
    assert float(m.group(3)) == pytest.approx(1e3 * sampling / nfe, abs=0.01)
    assert _fake_result(n, nfe, sampling, compile_s).samples_per_second == pytest.approx(n / sampling)


# ------------------------------------------------------------------ 10. lambda_s overflow
def test_huge_lambda_s_blames_the_sampler_and_leaks_no_numpy_warning(tmp_path, capsys):
    digits = pf.get_preset("digits")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError, match="the sampler diverged: the state overflowed") as info:
            pf.sample(digits, 4, nfe=50, lambda_s=1e6, progress=False)
    assert "network" not in str(info.value).split("with finite")[0], info.value
    messages = [str(w.message) for w in caught]
    assert not [t for t in messages if "overflow encountered" in t or "infx" in t], messages
    assert any("amplify" in t and "10^" in t for t in messages), messages
    err = _err(capsys, ["sample", "--lambda-s", "1e6", "--no-progress", "--out", str(tmp_path / "x.png")],
               warnings_first=True)
    assert "sampler diverged" in err and "lambda_s=1e+06" in err and "network returned" not in err
    with pytest.raises(ValueError, match="beyond float32"):
        pf.compile_sampler("reduced_oba", pf.PSLD(), 50, lambda_s=1e200)  # was an OverflowError traceback


# ------------------------------------------------------------------------------------ 5. Ctrl-C
def _start(argv, ready_marker):
    """The CLI in a subprocess that prints ``ready_marker`` once the command is inside sample()."""
    import os
    import subprocess
    import sys

    code = ("import signal, sys, psld_fast.cli as c, psld_fast.api as a\n"
            # as in a terminal, even when the test runner was started with SIGINT ignored (a background job)
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "orig = a.sample\n"
            "def announced(*args, **kw):\n"
            f"    print({ready_marker!r}, flush=True)\n"
            "    return orig(*args, **kw)\n"
            "c.sample = announced\n"
            "import psld_fast.generate\n"
            "psld_fast.api.sample = announced\n"
            f"sys.exit(c.main({argv!r}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _interrupt(proc, wait_for):
    import signal

    try:
        assert wait_for(), "the command never got going"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err.strip()


def test_ctrl_c_in_sample_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "s.npz"
    proc = _start(["sample", "--model", "gaussian", "-n", "100000", "--nfe", "20000", "--no-progress",
                   "--no-quality", "--out", str(out)], "sampling")
    code, _, err = _interrupt(proc, lambda: proc.stdout.readline().strip() == "sampling" and time.sleep(0.5) is None)
    assert code == 130 and err == "psld-fast sample: interrupted", (code, err)
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary file left either


def test_ctrl_c_in_generate_resumes_byte_identical(tmp_path, capsys):
    argv = ["generate", "--model", "digits", "--seeds", "0-299", "--nfe", "11", "--batch-size", "4",
            "--no-progress"]
    run = tmp_path / "run"
    proc = _start(argv + ["--out", str(run)], "sampling")

    def some_files_written():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 120 and proc.poll() is None:
            if len(list(run.rglob("*.png"))) >= 8:
                return True
            time.sleep(0.05)
        return False

    code, _, err = _interrupt(proc, some_files_written)
    assert code == 130, (code, err)
    assert err == ("psld-fast generate: interrupted; the finished sample files are kept: rerun the same command "
                   "to resume"), err
    kept = sorted(p.relative_to(run) for p in run.rglob("*.png"))
    assert 8 <= len(kept) < 300
    assert main(argv + ["--out", str(run)]) == 0  # the resume
    assert f"{len(kept)} already there" in capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "ref")]) == 0  # uninterrupted
    got = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.suffix == ".png")
    ref = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.png"))
    assert got == ref and len(ref) == 300
    assert all((run / p).read_bytes() == (tmp_path / "ref" / p).read_bytes() for p in ref)
    assert not [p for p in run.rglob("*.tmp")]


# ------------------------------------------------------------- 2, 11. fid: weights, inputs, -0
@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    import numpy as np

    from psld_fast.images import save_png

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(6):
        save_png(np.clip(rng.normal(0, 0.5, (3, 8, 8)), -1, 1).astype(np.float32), root / f"{i}.png")
    return root


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04" + bytes(100)])
def test_corrupt_inception_weights_are_one_line(tmp_path, capsys, tiny_images, content):
    from psld_fast import fid as F

    weights = tmp_path / F.INCEPTION_FILE
    weights.write_bytes(content)
    err = _err(capsys, ["fid", str(tiny_images), "--ref", str(tiny_images), "--inception-weights", str(weights),
                        "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert f"the Inception weights file {weights} ({len(content)} bytes) cannot be loaded" in err, err
    assert "fetch " + F.INCEPTION_FILE + " again" in err and "--extractor psld-random-conv" in err
    with pytest.raises(F.InceptionWeightsCorrupt):
        F.make_extractor(F.INCEPTION, weights=weights)


def test_missing_inception_weights_mention_the_offline_extractor(tmp_path, capsys, tiny_images, monkeypatch):
    from psld_fast import fid as F

    monkeypatch.delenv(F.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    err = _err(capsys, ["fid", str(tiny_images), "--ref", str(tiny_images), "--no-progress"])
    assert F.INCEPTION_FILE in err and "--extractor psld-random-conv" in err


def test_fid_inputs_are_checked_before_the_extractor_is_built(tmp_path, capsys, tiny_images, monkeypatch):
    from psld_fast import fid as F

    def no_extractor(*a, **k):
        raise AssertionError("the extractor was built before the inputs were checked")

    monkeypatch.setattr(F, "make_extractor", no_extractor)
    err = _err(capsys, ["fid", str(tiny_images), "--ref", str(tmp_path / "nowhere"), "--extractor", F.RANDOM_CONV,
                        "--no-progress"])
    assert err == f"psld-fast fid: error: no such reference file or folder: {tmp_path / 'nowhere'}"
    err = _err(capsys, ["fid", str(tmp_path / "nothing"), "--ref", str(tiny_images), "--no-progress"])
    assert err == f"psld-fast fid: error: no such sample file or folder: {tmp_path / 'nothing'}"


def test_fid_of_a_set_with_itself_prints_zero_not_minus_zero(tmp_path, capsys, tiny_images):
    from psld_fast import fid as F

    assert main(["fid", str(tiny_images), "--ref", str(tiny_images), "--extractor", F.RANDOM_CONV, "--no-progress",
                 "--no-kid", "--cache-dir", str(tmp_path / "c")]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FID")][0]
    assert line.split()[1] == "0.0000", line
    rng = __import__("numpy").random.default_rng(0)
    f = rng.normal(size=(4, 64)) * 0.05  # fewer samples than features: rank-deficient covariances
    mu, s = f.mean(0), __import__("numpy").cov(f, rowvar=False)
    assert F.frechet_distance(mu, s, mu, s) == 0.0


# ------------------------------------------------------------------------- 11. smaller ones
@pytest.mark.parametrize("nfes,needle", [("0,10", "--nfes 0,10: 0 is below the smallest allowed value 1"),
                                         ("", "--nfes '': give a comma-separated list of integers"),
                                         ("x,3", "--nfes x,3: 'x' is not an integer"),
                                         ("2,10", "nfe=2 is too small for sampler 'naive_obab'")])
def test_compare_nfes_are_checked_before_any_cell(capsys, monkeypatch, nfes, needle):
    import psld_fast.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda args: (_ for _ in ()).throw(AssertionError("model loaded")))
    err = _err(capsys, ["compare", "--samplers", "em,naive_obab", "--nfes", nfes])
    assert needle in err, err


def test_compare_says_why_a_cell_is_na(capsys):
    assert main(["compare", "--model", "ring2d", "--samplers", "em,sscs", "--nfes", "11", "-n", "16",
                 "--lambda-s", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "note: n/a for sscs: lambda_s is not defined for sscs" in out


@pytest.mark.parametrize("flag,value,needle", [("--nfes", "", "--nfes '': give a comma-separated list"),
                                               ("--nfes", "ten", "'ten' is not an integer"),
                                               ("--lambdas", "0.5,x", "--lambdas 0.5,x: 'x' is not a number"),
                                               ("--lambdas", "-1", "not a finite number >= 0"),
                                               ("--ci-lambdas", "nan", "not a finite number >= 0"),
                                               ("--nfes", "1", "nfe=1 fits none of the samplers")])
def test_sweep_grid_values_are_named(tmp_path, capsys, flag, value, needle):
    err = _err(capsys, ["sweep", "--model", "ring2d", flag, value, "--out", str(tmp_path / "s"), "--no-progress"])
    assert needle in err, err
    assert not (tmp_path / "s").exists()


def test_sweep_reference_checked_before_the_model(tmp_path, capsys):
    err = _err(capsys, ["sweep", "--checkpoint", str(tmp_path / "missing.ckpt"), "--ref", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "s")])
    assert "--ref" in err and "no such reference file or folder" in err, err


@pytest.mark.parametrize("seeds,needle", [("01", "got the string '01'"), (["0", "1"], "got strings"),
                                          (b"01", "got the string")])
def test_string_seeds_are_refused_with_a_clear_message(seeds, needle):
    with pytest.raises(ValueError, match=needle):
        pf.sample(pf.get_preset("ring2d"), 2, seeds=seeds, nfe=11, progress=False)


def test_sample_out_in_an_unwritable_place_is_refused_before_sampling(capsys, monkeypatch):
    import psld_fast.cli as cli

    monkeypatch.setattr(cli, "sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled first")))
    err = _err(capsys, ["sample", "--out", "/proc/x.png", "--no-progress"])  # os.access says yes for root
    assert err.startswith("psld-fast sample: error: --out /proc/x.png: /proc is not writable"), err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_logs_the_backend_before_or_after_the_subcommand(tmp_path, capsys, monkeypatch, where):
    from psld_fast import ops

    monkeypatch.setattr(ops, "_warned", set())  # each choice is logged once per process
    argv = ["sample", "-n", "2", "--nfe", "11", "--no-progress", "--no-quality", "--backend", "reference",
            "--out", str(tmp_path / "v.png")]
    argv = (["-v"] + argv) if where == "before" else (argv + ["-v"])
    try:
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "psld-fast sample: using the reference step on cpu (requested)" in err, err
    finally:
        main(["info"])  # back to WARNING for the tests that follow
        capsys.readouterr()


# ------------------------------------------------------------------------------- 12. threads
def test_set_threads_auto_is_the_clis_load_aware_default(monkeypatch):
    import os

    from psld_fast import guards

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (4.0, 4.0, 4.0))  # a loaded 2-core machine
        assert pf.set_threads("auto") == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert pf.set_threads("auto") == min(2, guards._TORCH_DEFAULT_THREADS)  # not stuck at the 1 set before
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert pf.set_threads() == 1
        assert pf.set_threads(2) == 2 and torch.get_num_threads() == 2
        for bad in (0, -1, "two", 1.5, True):
            with pytest.raises(ValueError, match="set_threads"):
                pf.set_threads(bad)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------- the README's error examples
def _readme_error_lines():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("Mistakes end with one line on stderr and exit code 2", 1)[1].split("```")[1]
    return [ln for ln in block.splitlines() if ln.startswith("psld-fast ")]


def test_readme_error_examples_are_what_the_commands_print(tmp_path, capsys, monkeypatch):
    """Each example line of the README (run in a folder where its relative paths exist)."""
    from psld_fast.learned import learned_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x.ckpt").write_bytes(learned_path("digits").read_bytes()[:5000])
    (tmp_path / "runs" / "ring").write_text("")
    cpu_only = not torch.cuda.is_available() and torch.version.cuda is None
    commands = {
        "--device cuda": (["sample", "--device", "cuda"], cpu_only),
        "--backend triton": (["sample", "--backend", "triton"], cpu_only),
        "runs/x.ckpt": (["sample", "--checkpoint", "runs/x.ckpt"], True),
        "argument --seeds": (["sample", "--seeds", "9223372036854775808"], True),
        "--out x.jpg": (["sample", "--out", "x.jpg"], True),
        "-n 8 and --seeds": (["sample", "-n", "8", "--seeds", "0-3"], True),
        "the sampler diverged": (["sample", "--lambda-s", "1e6", "--no-progress"], True),
        "--nfes 0,10": (["compare", "--nfes", "0,10"], True),
        "--out runs/ring": (["train", "--out", "runs/ring"], True),
    }
    lines = _readme_error_lines()
    checked = 0
    for key, (argv, applies) in commands.items():
        line = [ln for ln in lines if key in ln]
        assert len(line) == 1, (key, lines)
        if not applies:
            continue
        expected = line[0].replace("torch 2.13.0+cpu", f"torch {torch.__version__}")
        assert _err(capsys, argv, warnings_first=True) == expected
        checked += 1
    assert checked >= 7 and len(lines) == len(commands) + 1  # + the generate lock line (tests/test_generate.py)
    assert not list(tmp_path.glob("samples/*"))


# ------------------------------------------------- the sweep: same defects in other commands
@pytest.mark.parametrize("argv,needle", [
    (["sweep", "--model", "ring2d", "-n", "0"], "num_samples must be an integer >= 2, got 0"),
    (["sweep", "--model", "ring2d", "--n-boot", "0"], "n_boot must be an integer >= 2"),
    (["sweep", "--model", "ring2d", "--schedules", "bogus"], "unknown schedule 'bogus'"),
    (["sweep", "--model", "ring2d", "--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["train", "--ema-decay", "2"], "--ema-decay 2.0: give a number in [0, 1)"),
    (["train", "--max-minutes", "-1"], "--max-minutes -1.0: give a number > 0"),
    (["train", "--warmup", "-1"], "--warmup -1: give an integer >= 0"),
    (["train", "--lr", "nan"], "--lr nan: give a number > 0"),
])
def test_bad_knobs_fail_before_any_cell_or_step(tmp_path, capsys, argv, needle):
    """Were accepted: sweep marked every cell invalid (or ignored 0), train ran with them."""
    err = _err(capsys, argv + ["--out", str(tmp_path / "o"), "--no-progress"])
    assert needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,needle", [("--batch-size", "0", "batch_size must be an integer >= 1"),
                                               ("--kid-subsets", "0", "kid_subsets must be an integer >= 1"),
                                               ("--kid-subset-size", "0", "kid_subset_size must be an integer >= 2"),
                                               ("--kid-max-features", "-1", "kid_max_features must be an integer >= 2")])
def test_fid_counts_are_checked(capsys, tiny_images, flag, value, needle):
    err = _err(capsys, ["fid", str(tiny_images), "--ref", str(tiny_images), "--extractor", "psld-random-conv",
                        flag, value, "--no-progress"])
    assert needle in err and f"({flag})" in err, err


def test_generate_json_into_its_own_output_folder_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "g"
    err = _err(capsys, ["generate", "--seeds", "0-1", "--nfe", "3", "--out", str(out), "--json", str(out),
                        "--no-progress"])
    assert "is the output folder; give a file name" in err and not out.exists()


def test_training_data_and_resume_checkpoint_errors_name_the_file(tmp_path, capsys, digits_bytes):
    bad = tmp_path / "data.pt"
    bad.write_bytes(b"not a tensor file")
    err = _err(capsys, ["train", "--data", str(bad), "--out", str(tmp_path / "r"), "--no-progress"])
    assert f"training data {bad}: not a readable" in err, err
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes(digits_bytes[:5000])  # a resume from a cut checkpoint
    err = _err(capsys, ["train", "--out", str(run), "--steps", "1", "--no-progress"])
    assert err == f"psld-fast train: error: {run / 'last.ckpt'} is truncated or corrupt (not a complete torch.save archive)"


def test_unreadable_npz_inputs_of_fid_are_named_before_the_extractor(tmp_path, capsys, tiny_images, monkeypatch):
    from psld_fast import fid as F

    bad = tmp_path / "cut.npz"
    bad.write_bytes(b"PK\x03\x04" + bytes(50))
    monkeypatch.setattr(F, "make_extractor", lambda *a, **k: (_ for _ in ()).throw(AssertionError("extractor built")))
    for argv in ([str(bad), "--ref", str(tiny_images)], [str(tiny_images), "--ref", str(bad)]):
        err = _err(capsys, ["fid", *argv, "--extractor", "psld-random-conv", "--no-progress"])
        assert err == f"psld-fast fid: error: {bad} is not a readable .npz file (BadZipFile: File is not a zip file); " \
                      "truncated or another format?", err


def test_generate_refuses_a_seed_string(tmp_path):
    from psld_fast.generate import generate

    with pytest.raises(ValueError, match="got the string '0-9'"):
        generate(pf.get_preset("ring2d"), tmp_path / "g", "0-9", fmt="npz", progress=False)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("kw,exc,needle", [(dict(device="bogus"), ValueError, "device='bogus' is not a device"),
                                           (dict(sde="x"), TypeError, "sde must be a psld_fast.PSLD"),
                                           (dict(callback=3), TypeError, "callback must be callable"),
                                           (dict(generator=3), TypeError, "generator must be a torch.Generator")])
def test_sample_arguments_are_named_before_any_work(kw, exc, needle):
    with pytest.raises(exc, match=needle):
        pf.sample(pf.get_preset("ring2d"), 4, nfe=11, progress=False, **kw)


def test_sample_out_checked_before_the_checkpoint_is_read(tmp_path, capsys, monkeypatch):
    import psld_fast.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda args: (_ for _ in ()).throw(AssertionError("model loaded")))
    err = _err(capsys, ["sample", "--checkpoint", str(tmp_path / "big.ckpt"), "--out", str(tmp_path / "x.jpg")])
    assert "--out" in err and "unsupported suffix '.jpg'" in err
