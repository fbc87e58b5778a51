"""tanh-attention: element-wise attention ``attn(q, k, v) -> (o, a)``, ``a = tanh(q @ k^T)``.

Public names:

- :func:`attn`: the function to use; runs the first backend that supports the call.
- :func:`scaled_dot_product_attention`: the signature of
  ``torch.nn.functional.scaled_dot_product_attention``, tanh in place of softmax.
- :func:`backends`: every backend, in the order the dispatcher tries them; each says what it
  supports, whether it can run here, and why not (``not_supported_reasons``).
- :class:`AttnFunction`: stage 2, the ``torch.autograd.Function``.
- ``torch.ops.tanh_attention.attn_composite``: stage 3, the composite op.
- ``torch.ops.tanh_attention.attn`` / ``attn_backward``: stage 4, the explicit ops;
  ``attn_lean`` / ``attn_lean_backward``: the memory-efficient pair (o only).
"""

from . import composite as _composite  # registers torch.ops.tanh_attention.attn_composite
from . import ops as _ops  # registers torch.ops.tanh_attention.{attn, attn_lean}{,_backward}
from ._checks import SUPPORTED_DTYPES
from .api import attn, scaled_dot_product_attention
from .backends import Backend, backends
from .function import AttnFunction

__all__ = [
    "SUPPORTED_DTYPES",
    "AttnFunction",
    "Backend",
    "attn",
    "backends",
    "scaled_dot_product_attention",
]
__version__ = "0.1.0"

del _ops, _composite
