"""Reference models composed from the ops (SPEC section 6)."""
from .l2m import L2MConfig, L2MLayerState, L2MModel, L2MOutput, L2MState

__all__ = ["L2MConfig", "L2MLayerState", "L2MModel", "L2MOutput", "L2MState"]
