"""Comparisons: one YAML spec, a matrix of recipes, every cell trained and evaluated, one leaderboard.

``run_comparison(spec_path)`` is what ``cxr compare`` calls; :mod:`cxrkit.compare.spec` documents the spec format.
Importing this package imports no torch.
"""

from cxrkit.compare.runner import Plan, cell_status, plan_comparison, run_comparison
from cxrkit.compare.spec import Cell, ComparisonSpec, expand_cells, load_comparison

__all__ = ["Cell", "ComparisonSpec", "Plan", "cell_status", "expand_cells", "load_comparison", "plan_comparison",
           "run_comparison"]
