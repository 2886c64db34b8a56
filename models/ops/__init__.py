from ._extension import kernel_status
from .ms_deform_attn import MSDeformAttn
from .ms_deform_attn_func import (LevelShapes, implementation, is_exporting, level_shapes_of, ms_deform_attn,
                                  ms_deform_attn_pytorch)

__all__ = ["LevelShapes", "MSDeformAttn", "is_exporting", "implementation", "kernel_status", "level_shapes_of",
           "ms_deform_attn", "ms_deform_attn_pytorch"]
