"""Test configuration shared by every module.

TRITON_INTERPRET must be set before triton is first imported: without a GPU the Triton kernels run
on CPU tensors through Triton's interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
