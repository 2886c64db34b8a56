from ._extension import kernel_status
from .ms_deform_attn import MSDeformAttn
from .ms_deform_attn_func import implementation, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["MSDeformAttn", "implementation", "kernel_status", "ms_deform_attn", "ms_deform_attn_pytorch"]
