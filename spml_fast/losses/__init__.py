"""Loss terms beyond SPML's relations that a run can add to its objective
(``spml_fast.objective``): the tree-energy loss (TEL) and the adaptive
Gaussian-mixture loss (AGMM), both on the class head's prediction at the
embedding's resolution."""
from .gaussian_mixture import GaussianMixtureConfig, gaussian_mixture_loss, mixture_targets
from .tree_energy import TreeEnergyConfig, spanning_forest, tree_energy_loss, tree_filter

__all__ = ["GaussianMixtureConfig", "TreeEnergyConfig", "gaussian_mixture_loss", "mixture_targets",
           "spanning_forest", "tree_energy_loss", "tree_filter"]
