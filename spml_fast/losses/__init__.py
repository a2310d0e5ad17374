"""Loss terms beyond SPML's relations that a run can add to its objective
(``spml_fast.objective``): the tree-energy loss (TEL) and the adaptive
Gaussian-mixture loss (AGMM), both on the class head's prediction at the
embedding's resolution. The trees and the tree filter are ops:
``spml_fast.ops.spanning_tree``, ``spml_fast.ops.tree_filter``."""
from .gaussian_mixture import GaussianMixtureConfig, gaussian_mixture_loss, mixture_targets
from .tree_energy import ColourTree, TreeEnergyConfig, colour_tree, tree_energy_loss

__all__ = ["ColourTree", "GaussianMixtureConfig", "TreeEnergyConfig", "colour_tree", "gaussian_mixture_loss",
           "mixture_targets", "tree_energy_loss"]
