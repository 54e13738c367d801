"""Grouped matmul over rows sorted by expert: the public ops."""
from kernels_pallas.gmm.reference import gmm_reference as gmm
from kernels_pallas.gmm.reference import tgmm_reference as tgmm

__all__ = ["gmm", "tgmm"]
