"""Analysis of trained models: reading routing out (`capture_routing`)."""

from moejax.analysis.routing import LayerCapture, capture_routing, moe_layer

__all__ = ["LayerCapture", "capture_routing", "moe_layer"]
