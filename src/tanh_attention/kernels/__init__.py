"""Faster ways to compute the formulas of ``formulas.py`` (design.md section 3).

- :mod:`.tanh`: ``tanh(scale * q @ k^T)`` for one block, the elementwise hot spot, with the
  fastest method this machine offers that stays within 4 float32 ulp of the exact tanh.
- :mod:`.blockwise`: the blocked forward, backward and JVP drivers shared by the explicit op
  (``torch.ops.tanh_attention.attn``) and the memory-efficient op
  ``torch.ops.tanh_attention.attn_lean`` registered there (``o`` only, nothing of size n x m).

Kernels are tested against the float64 reference of ``tests/samples.py``, never against
themselves.
"""
