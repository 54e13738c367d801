"""Top-k MoE router: the public op."""
from kernels_pallas.router.reference import RouterSpec, Routing
from kernels_pallas.router.reference import route_reference as route

__all__ = ["route", "RouterSpec", "Routing"]
