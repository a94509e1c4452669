"""sample()'s argument corner cases, seed bounds, budgets and the divergence warning (issue 12.4-12.6)."""
import warnings

import numpy as np
import pytest
import torch

import psld_fast as pf
from psld_fast import guards


@pytest.fixture(scope="module")
def gauss():
    return pf.get_preset("gaussian")


def test_num_samples_as_numpy_int_or_0d_tensor(gauss):
    a = pf.sample(gauss, np.int64(3), nfe=11, progress=False)
    b = pf.sample(gauss, torch.tensor(3), nfe=np.int64(11), progress=False)
    assert a.x.shape[0] == b.x.shape[0] == 3 and torch.equal(a.x, b.x)
    for bad in (True, 2.0, torch.tensor(2.0), 0):
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
            pf.sample(gauss, bad, nfe=11, progress=False)


def test_seeds_outside_int64_are_refused(gauss):
    for bad, text in ((np.array([2**64 - 1], dtype=np.uint64), "wrap to a negative seed"),
                      ([2**63], "2**63-1"), ([-(2**63) - 1], "int64 range")):
        with pytest.raises(ValueError, match="int64 range") as e:
            pf.sample(gauss, 1, nfe=11, seeds=bad, progress=False)
        assert text in str(e.value)
    ok = pf.sample(gauss, 3, nfe=11, seeds=np.array([2**63 - 1, -(2**63), -5], dtype=np.int64), progress=False)
    assert ok.seeds.tolist() == [2**63 - 1, -(2**63), -5]
    dup = pf.sample(gauss, 2, nfe=11, seeds=[7, 7], progress=False)  # documented: same seed, same sample
    assert torch.equal(dup.x[0], dup.x[1])


def test_budgets_fail_fast(gauss):
    with pytest.raises(ValueError, match=r"nfe=1000000000 is above the limit of 100000"):
        pf.sample(gauss, 1, nfe=10**9, progress=False)
    with pytest.raises(MemoryError, match=r"GiB are available; draw fewer samples"):
        pf.sample(pf.get_preset("digits"), 10**12, nfe=11, progress=False, batch_size=4)


def test_shape_and_sde_never_mutate_the_callers_model(gauss):
    model = pf.get_preset("digits")
    net, shape, sde = model.net, model.shape, model.sde
    other = pf.PSLD(beta_max=7.0) if "beta_max" in pf.PSLD.__init__.__code__.co_varnames else pf.PSLD()
    pf.sample(model, 2, nfe=11, shape=shape, sde=other, progress=False)
    assert model.shape == shape and model.sde is sde and model.net is net


def test_schedule_error_shows_the_offending_values(gauss):
    sde = gauss.sde
    t_end = sde.T - sde.eps_end
    bad = np.array([0.0, 0.5, 0.4, t_end])
    with pytest.raises(ValueError, match=r"t\[1\] = 0.5 >= t\[2\] = 0.4"):
        pf.sample(gauss, 1, nfe=4, sampler="em", schedule=bad, progress=False)
    with pytest.raises(ValueError, match=r"it ends at 0.9"):
        pf.sample(gauss, 1, nfe=4, sampler="em", schedule=np.array([0.0, 0.3, 0.6, 0.9]), progress=False)


def test_divergence_warns_once_at_the_callers_line():
    model = pf.get_preset("digits")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pf.sample(model, 8, sampler="reduced_oba", nfe=5, split="additive", coupling="sequential", progress=False)  # THIS LINE
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert ours, [str(w.message) for w in caught]
    for w in ours:
        assert w.filename == __file__, (w.filename, str(w.message))
    data = [w for w in ours if "left the data range" in str(w.message)]
    assert len(data) == 1 and "reduced_oba at NFE 5" in str(data[0].message)


def test_no_warning_for_a_sane_run(gauss):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pf.sample(gauss, 8, nfe=51, progress=False)


def test_caller_stacklevel_helper():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guards.warn_at_caller("x")
    assert caught[0].filename == __file__


def test_callback_payload_matches_the_docstring(gauss):
    seen = []
    pf.sample(gauss, 5, nfe=11, batch_size=2, progress=False, callback=lambda d: seen.append(d))
    assert {"stage", "nfe", "tau", "u", "batch_start"} <= set(seen[0])
    assert sorted({d["batch_start"] for d in seen}) == [0, 2, 4]
    assert "batch_start" in pf.sample.__doc__
