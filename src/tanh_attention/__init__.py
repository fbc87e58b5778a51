"""tanh-attention: element-wise attention ``attn(q, k, v) -> (o, a)``, ``a = tanh(q @ k^T)``.

Public names:

- :func:`attn`: the function to use; picks the implementation (see :func:`implementation`).
- :class:`AttnFunction`: stage 2, the ``torch.autograd.Function``.
- :func:`backends`: every implementation known, and why one cannot run on this machine.
- ``torch.ops.tanh_attention.attn_composite``: stage 3, the composite op (the oracle).
- ``torch.ops.tanh_attention.attn`` / ``attn_backward``: stage 4, the explicit ops.
"""

from . import ops as _ops  # registers torch.ops.tanh_attention.{attn, attn_backward}
from . import reference as _reference  # registers torch.ops.tanh_attention.attn_composite
from ._checks import SUPPORTED_DTYPES
from .api import attn, implementation
from .function import AttnFunction
from .registry import Backend, backends

__all__ = ["SUPPORTED_DTYPES", "AttnFunction", "Backend", "attn", "backends", "implementation"]
__version__ = "0.1.0"

del _ops, _reference
