"""The loss modes of the sparse-KL loss, listed once.

Why it exists: a mode is named by the losses' argument checks, the trainer's config, the torch
reference and, by an integer code, the CUDA kernel. This table is the one list of them: each
row gives a mode's name, its code in kernels/sparse_kl.cu, and the per-row target rules both
implementations follow. Adding a mode touches this table, the math (kernels/reference.py,
kernels/sparse_kl.cu) and the tests. docs/loss.md derives the math.

Every mode trains the student toward a target p~ with T dL/dz = q - p~. Per row, with the
teacher's stored probabilities p_i = exp(t_i) on its K entries, P = sum_K p, the student
q = softmax(z / T) and Q = sum_K q:

    p~_i = c p_i                  on K    (c: the target scale)
    p~_j = r q_j / (1 - Q)        off K   (r: the teacher's tail mass kept as its own category)

so off K the gradient is q_j times the dense multiplier a = 1 - r / (1 - Q):

    mode     code  r              c              a
    bucket   0     max(1 - P, 0)  1 / max(P, 1)  1 - r / (1 - Q)
    renorm   1     0              1 / P          1
    sampled  2     0              1 / P          1   (targets log(counts / draws) already sum to 1)

Bucket's c renormalises the rare rows whose stored probabilities sum above 1 (rounding of
float16 storage, up to ~2e-3): such a row has no tail (r = 0), and with c = 1 the backward's
q - p would not be the derivative of the loss computed, P q - p (docs/loss.md). c = 1 / P makes
the row KL(p / P || q), whose derivative q - p / P the backward does use.

A mode that renormalises over K (r = 0) has no target in a row with P = 0: such a row trains
nothing (c = a = 0, loss 0). The kernel stores (lse, a, c) per row; so does the reference,
which keeps c in log space (log c = -log P, or -max(log P, 0) for bucket) and takes log(1 - Q)
without cancellation (docs/loss.md, "The tail log").

    from longkd.kernels.loss_modes import MODES, loss_mode
    loss_mode("renorm").code  # 1, the ``mode`` argument of sparse_kl_fwd_*
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from longkd.errors import LongkdError

if TYPE_CHECKING:
    from torch import Tensor

# sparse_kl.cu's LONGKD_ONE_MINUS_Q_FLOOR: the kernel forms 1 - Q directly and clamps it here,
# where its fp32 rounding (~1e-7) would otherwise reach log(0) (docs/kernels.md).
ONE_MINUS_Q_FLOOR = 1.0e-7


@dataclass(frozen=True)
class LossMode:
    """One loss mode: its name, its kernel code and its per-row target rules.

    The quantities are torch functions of per-row sums, shapes preserved ([N] or [N, 1]).
    Torch is not imported here (the trainer's config reads the names without loading it).

    Attributes:
        name: the ``mode`` argument of the losses and the run config's ``loss.mode``.
        code: the integer ``mode`` argument of sparse_kl.cu's forward kernels.
        keeps_tail: the teacher's mass off K is a category of its own (r = max(1 - P, 0),
            c = 1 / max(P, 1)). When False the targets are renormalised over K (r = 0, c = 1 / P) and a
            row with no target mass trains nothing.
        targets_sum_to_one: the targets are a full distribution over K (sampled counts);
            the reference warns when a row's do not sum to 1.
    """

    name: str
    code: int
    keeps_tail: bool
    targets_sum_to_one: bool = False

    def tail_mass(self, P: Tensor) -> Tensor:
        """r: the teacher's mass off K kept as a category, from P = sum_K p (0 if not kept)."""
        return (1 - P).clamp_min(0) if self.keeps_tail else P.new_zeros(P.shape)

    def target_scale(self, P: Tensor) -> Tensor:
        """c, the scale on p over K: 1 / max(P, 1) with a tail, else 1 / P (0 where P = 0)."""
        if self.keeps_tail:
            return 1 / P.clamp_min(1)
        return (1 / P).where(P > 0, 0.0)

    def log_target_scale(self, log_P: Tensor) -> Tensor:
        """log c as the reference computes it, from log P (a logsumexp of t over K)."""
        return -log_P.clamp_min(0) if self.keeps_tail else -log_P

    def dense_multiplier(self, P: Tensor, Q: Tensor) -> Tensor:
        """a, the factor on q_j off K, as the kernel computes it from P and Q = sum_K q.

        1 - r / (1 - Q) with 1 - Q clamped at ``ONE_MINUS_Q_FLOOR``; 1 without a tail
        category, and 0 in a row that trains nothing.
        """
        if self.keeps_tail:
            return 1 - self.tail_mass(P) / (1 - Q).clamp_min(ONE_MINUS_Q_FLOOR)
        return (P > 0).to(P.dtype)


MODES: dict[str, LossMode] = {
    mode.name: mode
    for mode in (
        LossMode("bucket", code=0, keeps_tail=True),
        LossMode("renorm", code=1, keeps_tail=False),
        LossMode("sampled", code=2, keeps_tail=False, targets_sum_to_one=True),
    )
}
MODE_NAMES: tuple[str, ...] = tuple(MODES)


def loss_mode(mode: str, caller: str = "sparse_kl") -> LossMode:
    """The table row of ``mode``.

    Args:
        mode: a mode name.
        caller: the function name that prefixes the error message.

    Returns:
        The ``LossMode``.

    Raises:
        LongkdError: an unknown mode, naming the valid ones.
    """
    found = MODES.get(mode) if isinstance(mode, str) else None
    if found is None:
        raise LongkdError(f"{caller}: unknown mode {mode!r}; use one of {', '.join(MODE_NAMES)}")
    return found
