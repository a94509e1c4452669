"""Test configuration shared by every module.

TRITON_INTERPRET must be set before triton is first imported: without a GPU the Triton kernels run
on CPU tensors through Triton's interpreter.

Hermetic: the suite writes nothing into the user's caches.  ``XDG_CACHE_HOME`` (psld_fast's FID
reference-statistics cache, ``~/.cache/psld_fast/fid`` by default), ``TRITON_CACHE_DIR`` and
``TORCHINDUCTOR_CACHE_DIR`` (torch.compile's cache, ``$TMPDIR/torchinductor_<user>`` by default) point
into a temporary folder removed at the end of the session; subprocesses inherit them.

Fixtures shared between checkouts (the PSLD NCSN++ reference tensors of tests/test_ncsnpp.py) are
read from ``shared/fixtures/psld_ncsnpp`` beside the repository, or from ``$PSLD_FAST_FIXTURES``;
without them those tests are skipped with a message saying so.
"""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CACHE_ROOT = tempfile.mkdtemp(prefix="psld_fast_tests_cache_")
os.environ["XDG_CACHE_HOME"] = os.path.join(_CACHE_ROOT, "xdg")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_CACHE_ROOT, "triton")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHE_ROOT, "inductor")
atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
