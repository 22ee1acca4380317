"""The synthetic world: objects whose class, colour and identity can be read off a latent.

A scene is a latent ``[4, 8, 8]`` (what a 64 px image gives in SD's VAE space) split into
two slots, the left and the right half ``[4, 8, 4]``. The first object a prompt names stands
in the left slot, the second in the right one; a one-object prompt leaves the right slot
empty. An object is

* its class (``person``, ``dog``, …): a spatial mask and a class texture,
* its colour: a mix of the four channels over the mask (random when the prompt names none),
* for a DreamBooth concept only, an identity code: a fixed pattern inside the class mask,
  orthogonal to everything the generic world contains, so the base model never draws it.

Everything is seeded; nothing is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

CHANNELS, HEIGHT, WIDTH = 4, 8, 8
SLOT_WIDTH = WIDTH // 2
LATENT_SIZE = HEIGHT * 8
"""Image side in pixels whose latent is ``[4, 8, 8]``."""
NOISE = 0.1
"""Standard deviation of the per-element noise every rendered latent carries."""
IDENTITY_RMS = 1.4
"""RMS of an identity code over its mask's elements (colours have norm ``COLOUR_NORM``)."""
COLOUR_NORM = 2.4
"""Norm of a colour's channel mix: objects' latents have RMS ≈ 1, as SD's scaled latents."""
TEXTURE_RMS = 0.6

_MASKS_TEXT = {
    # 8 rows x 4 columns, '#' = inside the object.
    "person": ".##. .##. #### .##. .##. .##. .##. .##.",
    "dog": ".... .... ...# #### #### #### #..# #..#",
    "cat": ".... .... .... #..# #### #### #### ####",
    "castle": ".... #.#. #### #### #### #### #..# #..#",
    "house": ".... .##. #### #### #..# #..# #### ####",
}
CLASSES: tuple[str, ...] = tuple(_MASKS_TEXT)
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "black")
TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}")


@dataclass(frozen=True)
class ToyConcept:
    """A new concept for a DreamBooth LoRA: ``trigger`` + ``noun`` (its class word)."""

    trigger: str
    noun: str

    @property
    def prompt(self) -> str:
        return f"{self.trigger} {self.noun}"


CONCEPTS: tuple[ToyConcept, ...] = (
    ToyConcept("ohwx", "person"),
    ToyConcept("zwx", "person"),
    ToyConcept("sks", "dog"),
    ToyConcept("qpr", "castle"),
)
"""The four concepts; the first two share the class word ``person`` and so compete."""


@dataclass(frozen=True)
class ToyObject:
    """One object of a scene: class, colour (``None`` = unnamed, random) and concept
    (``None`` = a generic member of the class)."""

    noun: str
    colour: str | None = None
    concept: ToyConcept | None = None

    def phrase(self, article: bool = True) -> str:
        """``"a red dog"``, ``"dog"``, ``"ohwx person"`` (concepts take no article)."""
        if self.concept is not None:
            return self.concept.prompt
        words = [self.colour, self.noun] if self.colour else [self.noun]
        return " ".join((["a"] if article else []) + words)


@dataclass(frozen=True)
class World:
    """The world's fixed parts.

    Attributes:
        masks: ``{class: [8, 4]}`` float 0/1.
        textures: ``{class: [4, 8, 4]}`` inside the class mask.
        colours: ``{colour: [4]}`` channel mixes of norm ``COLOUR_NORM``.
        identities: ``{trigger: [4, 8, 4]}`` identity codes, inside their class mask,
            orthogonal to every mask-times-channel pattern, every texture and each other.
    """

    masks: dict[str, torch.Tensor]
    textures: dict[str, torch.Tensor]
    colours: dict[str, torch.Tensor]
    identities: dict[str, torch.Tensor]


def _mask(text: str) -> torch.Tensor:
    rows = text.split()
    return torch.tensor([[1.0 if c == "#" else 0.0 for c in row] for row in rows])


@lru_cache(maxsize=4)
def build_world(seed: int = 0) -> World:
    """The world for ``seed`` (same seed, same world)."""
    g = torch.Generator().manual_seed(seed)
    masks = {name: _mask(text) for name, text in _MASKS_TEXT.items()}
    textures = {}
    for name, mask in masks.items():
        t = torch.randn(CHANNELS, HEIGHT, SLOT_WIDTH, generator=g) * mask
        textures[name] = t * TEXTURE_RMS / t.pow(2).sum().div(mask.sum() * CHANNELS).sqrt()
    # Four primaries and the two diagonals: every pair of colours at least COLOUR_NORM apart.
    mixes = torch.cat([torch.eye(CHANNELS), torch.full((1, CHANNELS), 0.5)])
    mixes = torch.cat([mixes, -mixes[-1:]])
    colours = {name: mix * COLOUR_NORM for name, mix in zip(COLOURS, mixes, strict=True)}
    # Everything a generic scene can put in a slot spans these patterns; identity codes are
    # made orthogonal to them so the base model has no reason to produce one.
    generic = [textures[n].flatten() for n in CLASSES]
    for mask in masks.values():
        for ch in range(CHANNELS):
            pattern = torch.zeros(CHANNELS, HEIGHT, SLOT_WIDTH)
            pattern[ch] = mask
            generic.append(pattern.flatten())
    basis, _ = torch.linalg.qr(torch.stack(generic).T.double())
    identities: dict[str, torch.Tensor] = {}
    for concept in CONCEPTS:
        mask = masks[concept.noun]
        code = (torch.randn(CHANNELS, HEIGHT, SLOT_WIDTH, generator=g) * mask).flatten().double()
        code -= basis @ (basis.T @ code)
        for other in identities.values():
            o = other.flatten().double()
            code -= o * (o @ code) / (o @ o)
        code = code.reshape(CHANNELS, HEIGHT, SLOT_WIDTH).float()
        rms = code.pow(2).sum().div(mask.sum() * CHANNELS).sqrt()
        identities[concept.trigger] = code * IDENTITY_RMS / rms
    return World(masks, textures, colours, identities)


def render_object(
    world: World, obj: ToyObject, g: torch.Generator, *, clean: bool = False
) -> torch.Tensor:
    """One object's slot ``[4, 8, 4]``; ``clean`` = unit brightness (class centroids)."""
    colour = obj.colour or COLOURS[int(torch.randint(len(COLOURS), (1,), generator=g))]
    brightness = 1.0 if clean else float(torch.empty(1).uniform_(0.85, 1.15, generator=g))
    mask = world.masks[obj.noun]
    slot = world.colours[colour][:, None, None] * mask * brightness + world.textures[obj.noun]
    if obj.concept is not None:
        slot = slot + world.identities[obj.concept.trigger]
    return slot


def render_scene(
    world: World, objects: list[ToyObject], g: torch.Generator, *, noise: float = NOISE
) -> torch.Tensor:
    """A scene latent ``[4, 8, 8]``: ``objects[0]`` left, ``objects[1]`` (if any) right."""
    latent = torch.randn(CHANNELS, HEIGHT, WIDTH, generator=g) * noise
    for i, obj in enumerate(objects[:2]):
        latent[:, :, i * SLOT_WIDTH : (i + 1) * SLOT_WIDTH] += render_object(world, obj, g)
    return latent


def slot(latents: torch.Tensor, place: int) -> torch.Tensor:
    """The ``place``-th slot (0 left, 1 right) of ``latents [B, 4, 8, 8]``: ``[B, 4, 8, 4]``."""
    return latents[..., place * SLOT_WIDTH : (place + 1) * SLOT_WIDTH]


def scene_prompt(objects: list[ToyObject], template: str = "{}", article: bool = True) -> str:
    """``"a red dog and a blue castle"`` in ``template``; the first-named stands left."""
    return template.format(" and ".join(o.phrase(article) for o in objects))


def random_scene(g: torch.Generator) -> tuple[str, list[ToyObject]]:
    """A generic training scene (no concept): one or two objects, colour named or not,
    article or not, one of ``TEMPLATES``."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    count = 1 + int(torch.rand(1, generator=g) < 0.5)
    objects = [
        ToyObject(pick(CLASSES), pick(COLOURS) if float(torch.rand(1, generator=g)) < 0.7 else None)
        for _ in range(count)
    ]
    article = float(torch.rand(1, generator=g)) < 0.5
    return scene_prompt(objects, pick(TEMPLATES), article), objects


def concept_object(concept: ToyConcept) -> ToyObject:
    """The object a concept's prompt stands for (its class, random colour, its identity)."""
    return ToyObject(concept.noun, None, concept)
