"""Distilling at a temperature other than the cache's: re-tempered targets, the T^2 factor.

Why it exists: a cache stores the teacher's log-probs at one temperature T_c (its manifest's
``temperature``), but a student may be trained at another, T. Tempering only the student's
logits would compare softmax(z / T) with a teacher still at T_c. Within the K stored entries
the teacher at T is known exactly up to normalisation: p_T(i) is proportional to
p_Tc(i)^(T_c / T), so the renormalised target (modes renorm and sampled) is re-tempered
exactly. The teacher's tail mass at T is not in the cache (it depends on how the tail mass
is spread over the missing ids), so the bucket mode is refused at T != T_c;
:func:`bucket_tail_bounds` gives the interval the tail can lie in, which is what the
refusal rests on (docs/loss.md, "Temperature", has the measurements).

The T^2 factor (Hinton et al.) keeps the KL's gradient comparable across temperatures: the
gradient of the tempered KL shrinks roughly as 1 / T^2. It is applied once, to the KL's
weight, by the trainer's loss assembly (trainer/losses.py), so every implementation (the
torch reference, the fused LM-head path, the CUDA kernel) gets it identically.

    from longkd.kernels.temperature import Temperatures, retemper_targets
    temps = Temperatures(cache=1.0, student=2.0, t2_scaling=True)
    tlp = retemper_targets(tlp, ids, cache_temperature=1.0, temperature=2.0, mode="renorm")
    loss = temps.kd_scale * sparse_kl(logits, ids, tlp, mode="renorm", temperature=2.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkd.errors import LongkdError
from longkd.kernels.loss_modes import loss_mode

F64 = torch.float64


@dataclass(frozen=True)
class Temperatures:
    """The temperatures in force for one student.

    Attributes:
        cache: T_c, the temperature the cache's log-probs were taken at.
        student: T, the temperature of the student's softmax (and of the re-tempered teacher).
        t2_scaling: the KL is multiplied by T^2.
    """

    cache: float
    student: float
    t2_scaling: bool

    @property
    def retempered(self) -> bool:
        """Whether the teacher's stored entries are re-tempered (T != T_c)."""
        return float(self.student) != float(self.cache)

    @property
    def kd_scale(self) -> float:
        """The factor on the KL: T^2 with ``t2_scaling``, else 1."""
        return float(self.student) ** 2 if self.t2_scaling else 1.0

    def describe(self) -> str:
        """One line for the run's log: cache and student temperatures, re-tempering, T^2."""
        how = "teacher re-tempered within its top entries" if self.retempered else "teacher as cached"
        scale = f"T^2 scaling on (KL x {self.kd_scale:g})" if self.t2_scaling else "T^2 scaling off"
        return f"cache T_c={self.cache:g}, student T={self.student:g} ({how}), {scale}"


def check_retemperable(mode: str, *, cache_temperature: float, temperature: float, name: str) -> None:
    """Refuse a loss mode that cannot be taken to ``temperature`` from a cache at ``cache_temperature``.

    Args:
        mode: "bucket" | "renorm" | "sampled".
        cache_temperature: T_c > 0.
        temperature: T > 0.
        name: what prefixes the message (a config path or a function name).

    Raises:
        LongkdError: bucket mode at T != T_c (its tail mass at T is not in the cache), naming
            the ways out; an unknown mode.
    """
    spec = loss_mode(mode, name)
    if spec.keeps_tail and float(temperature) != float(cache_temperature):
        raise LongkdError(
            f"{name}: mode {mode!r} at temperature {temperature:g} needs the teacher's tail mass at "
            f"T={temperature:g}, which a cache built at T={cache_temperature:g} does not hold; use mode "
            f"renorm (re-tempered exactly), temperature {cache_temperature:g} (the cache's), or a cache "
            f"built with --temperature {temperature:g}"
        )


def retemper_targets(
    target_logprobs: torch.Tensor,
    ids: torch.Tensor,
    *,
    cache_temperature: float,
    temperature: float,
    mode: str,
) -> torch.Tensor:
    """The teacher's stored entries taken from temperature T_c to T, renormalised over K.

    p_T(i) = p_Tc(i)^(T_c / T) / sum_K p_Tc(j)^(T_c / T): for the renormalised target this is
    exact (the teacher's logits give p_Tc(i) proportional to exp(z_i / T_c), so the
    proportionality constant cancels over K). For sampled targets, log(counts / draws), it
    re-tempers the empirical distribution, which is then an estimate (no longer unbiased) of
    the re-tempered teacher within the drawn ids. Computed in float64, returned in float32.

    Args:
        target_logprobs: float32 [N, K], log-probs at T_c (-inf at padding).
        ids: int64 [N, K], < 0 = padding.
        cache_temperature: T_c > 0.
        temperature: T > 0.
        mode: "renorm" | "sampled"; "bucket" only at T = T_c.

    Returns:
        float32 [N, K] log-probs at T, normalised over each row's live entries (-inf at
        padding; a row without live entries stays all -inf). ``target_logprobs`` itself when
        T = T_c.

    Raises:
        LongkdError: bucket mode at T != T_c (:func:`check_retemperable`), or a temperature
            that is not > 0.
    """
    for what, value in (("cache_temperature", cache_temperature), ("temperature", temperature)):
        if not float(value) > 0:
            raise LongkdError(f"retemper_targets: {what} must be > 0, got {value}")
    check_retemperable(
        mode, cache_temperature=cache_temperature, temperature=temperature, name="retemper_targets"
    )
    if float(temperature) == float(cache_temperature):
        return target_logprobs
    beta = float(cache_temperature) / float(temperature)
    t = target_logprobs.to(F64)
    live = (ids >= 0) & (t > float("-inf"))
    scaled = torch.where(live, beta * t, float("-inf"))
    norm = torch.logsumexp(scaled, dim=1, keepdim=True)
    norm = torch.where(torch.isfinite(norm), norm, 0.0)  # rows with no live entry stay -inf
    return torch.where(live, scaled - norm, float("-inf")).to(torch.float32)


def bucket_tail_bounds(
    target_logprobs: torch.Tensor,
    ids: torch.Tensor,
    *,
    cache_temperature: float,
    temperature: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval the teacher's tail mass at T can lie in, given a top-k row at T_c.

    The cache gives the K largest probabilities p_i at T_c and the tail mass r = 1 - P over
    the V - K missing ids, each of which is at most p_min, the K-th entry's probability. At T
    each tail entry becomes p_j^b / Z with b = T_c / T, so the tail mass at T is
    S / (A + S) with A = sum_K p_i^b and S = sum_tail p_j^b. Over all tails consistent with
    the cache, S is extreme when the tail is spread evenly, (V - K) (r / (V - K))^b, or packed
    into as few ids as possible, floor(r / p_min) ids at p_min and the remainder in one more;
    the even spread is the upper end for T > T_c and the lower end for T < T_c.

    Args:
        target_logprobs: float32 [N, K] top-k log-probs at T_c over the full vocabulary
            (-inf at padding).
        ids: int64 [N, K], < 0 = padding.
        cache_temperature: T_c > 0.
        temperature: T > 0.
        vocab_size: V, the teacher's vocabulary size.

    Returns:
        (low, high): float64 [N] bounds on the teacher's tail mass at T (both 0 where the
        row leaves no tail).
    """
    beta = float(cache_temperature) / float(temperature)
    t = target_logprobs.to(F64)
    live = (ids >= 0) & (t > float("-inf"))
    p = torch.where(live, t.exp(), 0.0)
    r = (1 - p.sum(1)).clamp_min(0)
    p_min = torch.where(live, p, float("inf")).amin(1)
    missing = float(vocab_size) - live.sum(1).to(F64)
    A = torch.where(live, p.pow(beta), 0.0).sum(1)
    even = missing * (r / missing.clamp_min(1)).pow(beta)
    full = torch.floor(r / p_min)
    packed = full * p_min.pow(beta) + (r - full * p_min).clamp_min(0).pow(beta)
    has_tail = (r > 0) & (missing > 0) & torch.isfinite(p_min)
    lo_s = torch.where(has_tail, torch.minimum(even, packed), 0.0)
    hi_s = torch.where(has_tail, torch.maximum(even, packed), 0.0)
    return lo_s / (A + lo_s), hi_s / (A + hi_s)
