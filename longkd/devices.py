"""Which torch device a command runs on: the one rule for ``--device`` / ``device:`` settings.

The cache build, the trainer and the eval and analysis commands all take a device name that
may be left out; this module turns it into the device string torch gets, the same way for
each of them. Under torchrun each rank takes its own GPU, ``cuda:LOCAL_RANK``.

    from longkd.devices import resolve_device
    resolve_device(None)                            # "cuda" when available, else "cpu"
    resolve_device("cuda", local_rank=3, world=8)   # "cuda:3"
"""

from __future__ import annotations

from longkd.errors import LongkdError

AUTO = "auto"


def resolve_device(
    name: str | None = None, *, local_rank: int = 0, world: int = 1, check: bool = False
) -> str:
    """The torch device string for a device setting.

    Args:
        name: ``None``, empty or ``"auto"`` (CUDA when available, else CPU), or any torch device
            string (``cpu``, ``cuda``, ``cuda:N``, ...).
        local_rank: this process's rank on its node (torchrun's ``LOCAL_RANK``).
        world: the number of processes in the job; above 1, a plain ``cuda`` becomes
            ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` or ``cpu`` is kept).
        check: refuse, on one line, a name that is not a torch device or that asks for CUDA
            where there is none; without it such a name is returned as given and fails later,
            where torch uses it.

    Returns:
        The device string, e.g. ``"cpu"``, ``"cuda"`` or ``"cuda:3"``.

    Raises:
        LongkdError: with ``check``, an unknown device string, or CUDA asked for but not available.
    """
    import torch

    if not name or name == AUTO:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        name = f"cuda:{local_rank}"
    if check:
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise LongkdError(
                f"device: {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)"
            ) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LongkdError(f"device: {name!r} asked for but CUDA is not available; use --device cpu")
    return name
