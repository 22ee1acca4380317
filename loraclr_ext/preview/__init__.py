"""The preview grid: images generated on the loaded checkpoint after a merge (issue 12).

Each concept alone with the merged LoRA, and the joint prompt with the merged LoRA beside
the same prompt with the input LoRAs stacked, all on one seed. The host draws the images
with its own sampler through a :class:`~loraclr_ext.preview.grid.Renderer`; this package
chooses the cells, runs them and lays the grid out.
"""
