"""LoRA files: container checks, the formats registry, architecture detection, reading
into deltas, trigger metadata, and writing kohya output. Depends on ``model`` only."""
