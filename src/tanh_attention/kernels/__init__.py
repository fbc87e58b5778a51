"""Pure compute: faster ways to evaluate the formulas of ``formulas.py``.

Nothing here registers an op or knows about autograd (``ops.py`` does that).

- :mod:`.cpu`: the two block primitives, ``tanh(scale * q @ k^T)`` (oneDNN's matmul with a
  fused tanh where a probe shows it accurate) and ``x @ y^T + c``.
- :mod:`.blocks`: the formulas on one block, in place.
- :mod:`.blockwise`: the blocked forward, backward and JVP drivers of the CPU backend.
- :mod:`.memory`: a warm heap for the block buffers.
- :mod:`.native`: the compiled C kernels (``tanh.c``: the tanh of float32 blocks;
  ``attn.c``: the whole forward of a float32 call, the whole backward of a small one), built
  on first use.
- :mod:`.triton_attn`: the fused Triton kernels of the GPU backend.

Kernels are tested against the float64 reference of ``tests/samples.py``, never against
themselves.
"""
