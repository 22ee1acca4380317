"""Read the world back out of generated latents: identity scores and object recognition.

Both measures are fitted on the world's own renders, never on generations:

* an identity prototype per concept, ``mean(concept renders) − mean(class renders)`` of its
  slot; the raw identity of a slot is its projection on the prototype (≈ 1 for a rendered
  concept, ≈ 0 for a generic member of the class);
* nearest-centroid recognition of (class, colour) per slot, with "empty" as one more label.

Generation runs through the host's own denoising call and the merge's hooks
(:func:`generate`), so a LoRA is applied exactly as the merge applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from loraclr_ext.demo.toyworld.world import (
    CLASSES,
    COLOURS,
    CONCEPTS,
    LATENT_SIZE,
    ToyObject,
    World,
    concept_object,
    render_object,
    render_scene,
    scene_prompt,
    slot,
)
from loraclr_ext.hosts.base import Host
from loraclr_ext.hosts.ddim import ddim_sample
from loraclr_ext.model.deltas import ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.hooks import applied

EMPTY = ("empty", "")
"""The label of a slot with no object."""


@dataclass(frozen=True)
class Prototypes:
    """What the measures compare against.

    Attributes:
        codes: ``{trigger: [4, 8, 4]}`` identity prototypes.
        class_means: ``{class: [4, 8, 4]}`` mean render of a generic member.
        centroids: ``[K, 128]`` clean renders of every (class, colour) and the empty slot.
        labels: the ``K`` labels ``(class, colour)`` (``EMPTY`` last).
    """

    codes: dict[str, torch.Tensor]
    class_means: dict[str, torch.Tensor]
    centroids: torch.Tensor
    labels: list[tuple[str, str]]


def fit_prototypes(world: World, renders: int = 256, seed: int = 0) -> Prototypes:
    """Prototypes from ``renders`` random renders per class and per concept."""
    g = torch.Generator().manual_seed(seed)

    def mean_of(obj: ToyObject) -> torch.Tensor:
        return torch.stack([render_object(world, obj, g) for _ in range(renders)]).mean(0)

    class_means = {noun: mean_of(ToyObject(noun)) for noun in CLASSES}
    codes = {c.trigger: mean_of(concept_object(c)) - class_means[c.noun] for c in CONCEPTS}
    labels = [(noun, colour) for noun in CLASSES for colour in COLOURS]
    centroids = [
        render_object(world, ToyObject(noun, colour), g, clean=True).flatten()
        for noun, colour in labels
    ]
    centroids.append(torch.zeros_like(centroids[0]))
    labels.append(EMPTY)
    return Prototypes(codes, class_means, torch.stack(centroids), labels)


def raw_identity(
    protos: Prototypes, latents: torch.Tensor, place: int, trigger: str, noun: str
) -> torch.Tensor:
    """Per latent ``[B]``: projection of slot ``place`` (minus the mean ``noun``) on the
    prototype of ``trigger``; ≈ 1 when the concept is drawn there, ≈ 0 when it is not."""
    code = protos.codes[trigger]
    region = slot(latents.float(), place) - protos.class_means[noun]
    return (region * code).flatten(1).sum(1) / code.pow(2).sum()


def recognise(protos: Prototypes, latents: torch.Tensor, place: int) -> list[tuple[str, str]]:
    """The nearest (class, colour) label of slot ``place`` of every latent."""
    flat = slot(latents.float(), place).flatten(1)
    nearest = torch.cdist(flat, protos.centroids).argmin(1)
    return [protos.labels[int(i)] for i in nearest]


def generate(
    host: Host,
    prompts: Sequence[str],
    deltas: Mapping[ModuleRef, ModuleDelta],
    *,
    seeds: int,
    steps: int,
    seed: int = 0,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Latents ``[P, seeds, 4, 8, 8]`` of every prompt with ``deltas`` applied by hooks.

    One deterministic DDIM run (η = 0, no guidance, ``hosts.ddim``) over all
    ``P × seeds`` rows, its noise from CPU generator ``seed``: the same rows get the same
    starting noise in every configuration, so configurations differ only by their deltas.
    """
    rows = [p for p in prompts for _ in range(seeds)]
    modules = host.modules(deltas)
    with torch.no_grad(), applied(modules, deltas):
        cond = host.encode(rows)

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            return host.predict_noise(x, t, cond)

        latents = ddim_sample(
            predict,
            alphas_cumprod,
            len(rows),
            steps=steps,
            size=LATENT_SIZE,
            seed=seed,
            v_prediction=False,
        )
    return latents.reshape(len(prompts), seeds, *latents.shape[1:])


@dataclass(frozen=True)
class Recognition:
    """Share of slots whose class, colour, and both were recognised (empty slots count as
    recognised when they are recognised as empty)."""

    noun: float
    colour: float
    both: float
    slots: int


def recognition(
    protos: Prototypes, latents: torch.Tensor, scenes: Sequence[Sequence[ToyObject]]
) -> Recognition:
    """Score ``latents [P, S, 4, 8, 8]`` generated for ``scenes`` (named colours only)."""
    noun = colour = both = total = 0
    for scene, batch in zip(scenes, latents, strict=True):
        for place in range(2):
            truth = (scene[place].noun, scene[place].colour or "") if place < len(scene) else EMPTY
            for found in recognise(protos, batch, place):
                noun += found[0] == truth[0]
                colour += found[1] == truth[1]
                both += found == truth
                total += 1
    return Recognition(noun / total, colour / total, both / total, total)


def recognition_scenes(count: int, seed: int = 0) -> list[list[ToyObject]]:
    """Every one-object scene with a named colour, then ``count`` random two-object ones."""
    g = torch.Generator().manual_seed(seed)
    singles = [[ToyObject(n, c)] for n in CLASSES for c in COLOURS]

    def pick(options: tuple[str, ...]) -> str:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    pairs = [
        [ToyObject(pick(CLASSES), pick(COLOURS)), ToyObject(pick(CLASSES), pick(COLOURS))]
        for _ in range(count)
    ]
    return singles + pairs


def rendered_check(world: World, protos: Prototypes, seed: int = 1) -> Recognition:
    """Recognition on fresh renders (the measure's own ceiling, ≈ 1)."""
    g = torch.Generator().manual_seed(seed)
    scenes = recognition_scenes(30, seed)
    latents = torch.stack([render_scene(world, list(s), g)[None] for s in scenes])
    return recognition(protos, latents, scenes)


def denoised_recognition(
    host: Host,
    world: World,
    protos: Prototypes,
    timestep: int,
    alphas_cumprod: torch.Tensor,
    seed: int = 5,
) -> Recognition:
    """Recognition of the model's one-step ``x0`` estimate from rendered scenes noised to
    ``timestep``: how well the model knows the world when the noise leaves it a start."""
    g = torch.Generator().manual_seed(seed)
    scenes = recognition_scenes(30, seed)
    x0 = torch.stack([render_scene(world, list(s), g) for s in scenes])
    a = alphas_cumprod[timestep].float()
    xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        cond = host.encode([scene_prompt(list(s)) for s in scenes])
        eps = host.predict_noise(xt, timestep, cond).float().cpu()
    estimate = (xt - (1 - a).sqrt() * eps) / a.sqrt()
    return recognition(protos, estimate[:, None], scenes)
