"""The per-layer LoRACLR solver: statistics in, exact LoRA factors out. Pure torch."""

from loraclr_ext.solver import precision
from loraclr_ext.solver.features import ConvGeometry, input_rows
from loraclr_ext.solver.settings import OFFICIAL_DEFAULTS, SolverSettings
from loraclr_ext.solver.solve import LayerSolution, solve_layer
from loraclr_ext.solver.stats import NEUTRAL, LayerStats

__all__ = [
    "NEUTRAL",
    "OFFICIAL_DEFAULTS",
    "ConvGeometry",
    "LayerSolution",
    "LayerStats",
    "SolverSettings",
    "input_rows",
    "precision",
    "solve_layer",
]
