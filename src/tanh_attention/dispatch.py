"""Which backend runs a call: the first registered one that supports it, or the one forced.

The choice reads only the call's own inputs (devices, dtypes, shapes, mask, causal variant,
whether weights are wanted, the tangents and ``torch.func`` wrappers the tensors carry) and
per-thread state, never process-wide state, so one thread's context cannot change another
thread's path. :func:`explain` shows the reasons a user would otherwise have to guess.
"""

from __future__ import annotations

from .backends import Backend, Inputs, backends, get

__all__ = ["explain", "select"]


def _shapes(inputs: Inputs) -> str:
    return (
        f"q{tuple(inputs.q.shape)}, k{tuple(inputs.k.shape)}, v{tuple(inputs.v.shape)}, "
        f"{inputs.dtype}, {inputs.q.device}, causal={inputs.causal!r}, "
        f"mask={'yes' if inputs.attn_mask is not None else 'no'}, "
        f"need_weights={inputs.need_weights}"
    )


def explain(inputs: Inputs) -> dict[str, list[str]]:
    """Every backend's reasons for not running ``inputs`` (an empty list: it can)."""
    return {b.name: b.not_supported_reasons(inputs) for b in backends()}


def select(inputs: Inputs, backend: str | None = None) -> Backend:
    """The backend that runs ``inputs``: ``backend`` if named (it must fit), else the first
    registered one that fits and does not ask to be forced (``Backend.dispatch_reasons``).

    Raises:
        ValueError: the named backend is unknown or cannot run the call, or none can; the
            message lists each backend's reasons.
    """
    if backend is not None:
        chosen = get(backend)
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            raise ValueError(
                f"attn(): backend={backend!r} cannot run this call ({_shapes(inputs)}): "
                + "; ".join(reasons)
                + ". Pass backend=None to let the dispatcher pick one that can."
            )
        return chosen
    for candidate in backends():
        # The device alone rules most backends out: their reasons are gathered only for the
        # error below.
        if inputs.device_type not in candidate.device_types:
            continue
        if not (candidate.not_supported_reasons(inputs) or candidate.dispatch_reasons(inputs)):
            return candidate
    found = [
        f"  {b.name}: {'; '.join(b.not_supported_reasons(inputs) or b.dispatch_reasons(inputs))}"
        for b in backends()
    ]
    raise ValueError(
        f"attn(): no backend can run this call ({_shapes(inputs)}):\n" + "\n".join(found)
    )
