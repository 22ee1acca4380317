"""The model layer: architectures, module references and their layout tables, key naming,
per-module deltas and low-rank helpers. Imports nothing else of the package but ``errors``."""
