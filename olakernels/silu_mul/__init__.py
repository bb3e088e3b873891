# silu_mul: SwiGLU's silu(gate) * up in one pass each way, saving gate and up only.
from .api import silu_mul
from .impl.reference import silu_mul_ref

__all__ = ["silu_mul", "silu_mul_ref"]
