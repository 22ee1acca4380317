"""``modules.devices``: CPU device, a null ``autocast`` (fp32), ``torch_gc``."""

from contextlib import nullcontext

import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype = torch.float32


def autocast(disable: bool = False):
    return nullcontext()


def torch_gc() -> None:
    pass
