"""Device parameters shared by the Triton test modules: CPU under Triton's interpreter, CUDA when a
GPU is present (and the interpreter is off); the other cases are reported as skips with the reason."""
import pytest
import torch


def triton_device_params():
    try:
        import triton  # noqa: F401
        from psld_fast import triton_step
    except ImportError:
        return [pytest.param("cpu", marks=pytest.mark.skip(reason="triton is not installed"))]
    params = []
    if triton_step.INTERPRETED:
        params.append("cpu")
    else:
        params.append(pytest.param("cpu", marks=pytest.mark.skip(
            reason="TRITON_INTERPRET=1 was not set before triton was first imported (tests/conftest.py)")))
    if torch.cuda.is_available() and not triton_step.INTERPRETED:
        params.append("cuda")
    else:
        params.append(pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device (or interpreter on)")))
    return params
