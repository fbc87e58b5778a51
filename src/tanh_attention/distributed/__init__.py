"""``tanh_attention.distributed``: tanh attention on PyTorch's distributed stack.

- :func:`context_parallel_attn`: attention over a sequence sharded across a process group
  (methods ``"allgather"``, ``"alltoall"``, ``"ring"``; layouts None and ``"head_tail"``).
  Tanh attention is an exact sum of per-key-block contributions, so no log-sum-exp merge.
- :func:`shard_sequence` / :func:`unshard_sequence`: split and reassemble in those layouts.
- :class:`ContextParallel`: a ``ParallelStyle`` for ``parallelize_module`` that makes
  :class:`tanh_attention.nn.MultiheadTanhAttention` layers context parallel.
- Importing this module registers the DTensor sharding rules of the ops (batch and head
  sharding, query rows for non-causal calls, replicate), keyed on ``scale`` and ``causal``.

Everything here runs on CPU with gloo and on CUDA with NCCL (the same collectives).
"""

from ._context import METHODS, context_parallel_attn
from ._layout import LOAD_BALANCES, shard_sequence, unshard_sequence
from ._sharding import register as _register_sharding
from ._style import ContextParallel

__all__ = [
    "LOAD_BALANCES",
    "METHODS",
    "ContextParallel",
    "context_parallel_attn",
    "shard_sequence",
    "unshard_sequence",
]

_register_sharding()
