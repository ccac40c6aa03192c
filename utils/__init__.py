"""Shared building blocks of the mini_qwen stages: one concern per module, none aware of which stage calls it.

Importing this package first also silences import-time warnings that no user can act on (each entry point
imports it before any third-party module):
- torchao (imported by peft) logs "Failed to load .../_C_mxfp8...so" for its CUDA-only kernels on a CPU build;
- torch's pytree logs "<enum ...> is an Enum subclass and is now natively supported by torch.compile" for enums that
  torchao still registers the old way.
Errors from both still show.
"""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
