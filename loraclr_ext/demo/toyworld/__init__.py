"""A trained toy world: a tiny text-to-image model, DreamBooth LoRAs of new concepts on it,
and an identity measure on its generated latents (issue 12, item 2)."""
