"""The host-tensor helpers and the weight guard on every kind of tensor a WebUI hands over:
ordinary, inference tensors (Forge builds its model in inference mode), and parameters made
in inference mode whose data was swapped outside it (what broke a real Forge)."""

from __future__ import annotations

import pytest
import torch

from loraclr_ext.hosts.weights import (
    plain_copy,
    to_cpu_float,
    weights_fingerprint,
    write_into,
)


def inference_linear() -> torch.nn.Linear:
    with torch.inference_mode():
        return torch.nn.Linear(4, 3)


def swapped_outside_inference() -> torch.nn.Embedding:
    """A parameter made in inference mode, its data recast outside it."""
    with torch.inference_mode():
        emb = torch.nn.Embedding(10, 4)
    with torch.no_grad():
        emb.to(torch.float16)
    with pytest.raises(RuntimeError, match="Inference tensors do not track version counter"):
        emb.weight.detach().reshape(-1)  # the fingerprint's old read
    return emb


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(4, 3), inference_linear])
def test_reads_give_ordinary_copies(make):
    layer = make()
    weight = to_cpu_float(layer.weight)
    assert not weight.is_inference() and weight.dtype == torch.float32
    assert torch.equal(weight, layer.weight.detach().float())
    weight.add_(1)  # a copy: writable, host untouched
    assert not torch.equal(weight, layer.weight.detach().float())
    copy = plain_copy(layer.weight)
    assert not copy.is_inference() and copy.data_ptr() != layer.weight.data_ptr()


def test_swapped_parameter_is_read_and_fingerprinted():
    emb = swapped_outside_inference()
    assert torch.equal(to_cpu_float(emb.weight), emb.weight.data.float())
    assert len(weights_fingerprint(emb)) == 64


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(4, 3), inference_linear])
def test_write_into_any_kind(make):
    layer = make()
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    write_into(layer.weight, values)
    assert torch.equal(to_cpu_float(layer.weight), values)


def test_fingerprint_sees_values_not_storage_dtype():
    with torch.inference_mode():
        emb = torch.nn.Embedding(10, 4).to(torch.float16)
    before = weights_fingerprint(emb)
    with torch.inference_mode():
        emb.to(torch.float32)  # Forge's text engine: same values, fp32 storage
    assert weights_fingerprint(emb) == before
    with torch.inference_mode():
        emb.weight[3, 1] += 0.5
    assert weights_fingerprint(emb) != before
