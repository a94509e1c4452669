"""What `import psld_fast` alone provides, checked in a fresh interpreter."""
import subprocess
import sys


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_ops_exist_right_after_import_psld_fast():
    out = _fresh(
        "import torch, psld_fast\n"
        "op, fn = torch.ops.psld_fast.affine_step_, torch.ops.psld_fast.affine_step\n"
        "u = torch.zeros(2, 2, 3); s = torch.arange(2)\n"
        "v = fn(u, None, s, [1.0] + [0.0] * 15, 0, 0)\n"
        "assert v.shape == u.shape and torch.equal(u, torch.zeros(2, 2, 3))\n"
        "op(u, None, s, [1.0] + [0.0] * 15, 0, 0)\n"
        "import sys; assert 'triton' not in sys.modules\n"
        "print('ok')\n")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# The import graph (no cycles, layering) is tested in tests/test_imports.py.


def test_cli_modules_import_alone():
    for mod in ("psld_fast.cli_common", "psld_fast.cli_generate", "psld_fast.cli_train", "psld_fast.cli"):
        out = _fresh(f"import {mod}")
        assert out.returncode == 0, (mod, out.stderr[-1500:])


def test_the_suite_writes_no_user_cache():
    import os

    from psld_fast import fid

    home_cache = os.path.join(os.path.expanduser("~"), ".cache")
    assert not str(fid._cache_dir()).startswith(home_cache), fid._cache_dir()
    assert not os.environ["TRITON_CACHE_DIR"].startswith(os.path.expanduser("~"))


def test_the_suite_leaves_no_inductor_cache_in_tmpdir():
    """torch.compile's cache defaults to $TMPDIR/torchinductor_<user>, which outlives the session."""
    import os
    import tempfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    default = os.path.join(tempfile.gettempdir(), "torchinductor_")
    assert not cache_dir().startswith(default), cache_dir()
    assert os.path.dirname(cache_dir()) == os.path.dirname(os.environ["TRITON_CACHE_DIR"])  # the session's folder
