"""The privacy statement shown in reports and in the app: precise, never more than holds."""

from __future__ import annotations


def privacy_statement(*, dp: bool, secagg: bool, epsilon: float | None, delta: float,
                      threshold: int | None, accountant: str = "RDP") -> str:
    """Markdown text saying what is protected, from whom, with which ε and δ."""
    parts: list[str] = []
    if dp and epsilon is not None:
        parts.append(
            f"**Differential privacy.** Every model update a hospital sends is "
            f"(ε = {epsilon:g}, δ = {delta:g})-differentially private with respect to adding or removing "
            f"any single training image at that hospital, accounted ({accountant}) over every local "
            f"DP-SGD step of every round. This bounds what anyone who sees the updates or the final "
            f"model (the aggregator, other hospitals, users of the model) can learn about one image. "
            f"It is per image: a patient who contributes several images is protected with a "
            f"correspondingly larger ε. Each hospital enforces its own budget and stops taking part "
            f"when the next round would exceed it."
        )
    else:
        parts.append(
            "**No differential privacy (non-private baseline).** Updates are not noised; the "
            "aggregated model can reveal information about individual training images."
        )
    if secagg and threshold is not None:
        parts.append(
            f"**Secure aggregation** (Bonawitz et al. 2017, semi-honest model). The aggregator sees "
            f"only masked updates and learns the sum over the surviving hospitals of each round, "
            f"never one hospital's update, sample count or validation counts, as long as it does "
            f"not collude with {threshold - 1} or more hospitals (threshold t = {threshold}); a round "
            f"with fewer than t surviving hospitals is abandoned without revealing anything. It does "
            f"not protect against an actively malicious aggregator that lies about which hospitals "
            f"are present, nor against a malicious hospital sending a poisoned update."
        )
    else:
        parts.append(
            "**No secure aggregation.** The aggregator sees each hospital's individual update "
            "(with the DP guarantee above, if any)."
        )
    parts.append(
        "**Not covered.** The hospital's validation images: their confusion counts leave the site "
        "only inside the securely aggregated sum" + (" " if secagg else " (here: in the clear) ")
        + "and carry no DP noise. The fact that a hospital takes part, its timing and message sizes."
        " The transport is TLS-encrypted and every site authenticates with its identity key."
    )
    return "\n\n".join(parts)
