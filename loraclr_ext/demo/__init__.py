"""The built-in demo: a tiny SD model built offline and concept LoRAs fitted on it."""
