"""A1111 re-applies a LoRA to a layer only when the layer's ``network_current_names``
(name, multipliers) differ from the wanted set; a file's content is not part of it. A real
A1111 1.10.1 kept the first ``live_same`` merged in its weights after the file was merged
again under that name: the next seeded image was byte-identical to the one before."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from loraclr_ext.hosts.webui.make import forget_cached_loras


def _layer(names: tuple) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 2)
    layer.network_current_names = names
    return layer


def test_layers_carrying_a_rewritten_lora_are_applied_again():
    rewritten = _layer((("merged", 1.0, 1.0, 1.0),))
    other = _layer((("other", 1.0, 1.0, 1.0),))
    plain = _layer(())
    model = SimpleNamespace(network_layer_mapping={"a": rewritten, "b": other, "c": plain})
    weights = [m.weight.detach().clone() for m in (rewritten, other, plain)]
    forget_cached_loras(model, SimpleNamespace(), written="merged")
    # What A1111 compares with the prompt's set: no longer equal, so it restores the
    # backup and applies the new file; the others keep theirs; no weight is touched here.
    assert rewritten.network_current_names != (("merged", 1.0, 1.0, 1.0),)
    assert other.network_current_names == (("other", 1.0, 1.0, 1.0),)
    assert plain.network_current_names == ()
    assert all(torch.equal(m.weight, w) for m, w in zip((rewritten, other, plain), weights))
