"""The privacy statement shown in reports and in the app: precise, never more than holds."""

from __future__ import annotations


def privacy_statement(*, dp: bool, secagg: bool, epsilon: float | None, delta: float,
                      threshold: int | None, accountant: str = "RDP", dp_mode: str = "local",
                      colluders: int = 1) -> str:
    """Markdown text saying what is protected, from whom, with which ε and δ."""
    parts: list[str] = []
    if dp and epsilon is not None and dp_mode == "distributed":
        parts.append(
            f"**Differential privacy, distributed through secure aggregation.** Each round, each hospital "
            f"takes one DP-SGD step's clipped gradient sum over a Poisson sample of its images and adds a "
            f"*share* of Skellam noise to it inside secure aggregation; the sum the aggregator unmasks (at "
            f"least t = {threshold} hospitals) carries the full noise. What the aggregator unmasks and every "
            f"model it releases are (ε = {epsilon:.4g}, δ = {delta:g})-differentially private with respect to "
            f"adding or removing any single training image at any hospital, accounted ({accountant}, Skellam "
            f"mechanism, Poisson subsampling) over every round. This holds against the aggregator, the other "
            f"hospitals and users of the model, **assuming** the aggregator follows the secure-aggregation "
            f"protocol (it never sees one hospital's masked contribution unmasked) and at most {colluders} "
            f"hospital(s) pool their own noise shares with it (more colluders weaken the noise; "
            f"docs/privacy.md gives the ε then). One hospital's contribution on its own carries only its "
            f"share of the noise: secure aggregation, not DP, is what hides it. Each hospital records every "
            f"round in its own ledger before sending and refuses a plan whose rounds would pass its budget."
        )
    elif dp and epsilon is not None:
        parts.append(
            f"**Differential privacy.** Every model update a hospital sends is "
            f"(ε = {epsilon:.4g}, δ = {delta:g})-differentially private with respect to adding or removing "
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
            f"**Secure aggregation** (with dropouts and a signed consistency check). The aggregator sees only "
            f"masked updates and learns the sum over the surviving "
            f"hospitals of each round, never one hospital's update, sample count or validation counts, "
            f"as long as it does not collude with {threshold - 1} or more hospitals (threshold "
            f"t = {threshold}); a round with fewer than t surviving hospitals is abandoned without "
            f"revealing anything (a hospital that had already trained its update for it still counts that round in its "
            f"privacy ledger). Survivors sign the survivor list, so the aggregator cannot tell "
            f"different hospitals different lists; with a pinned roster it cannot add keys of its own. "
            f"It can still pretend that hospitals dropped out (the sum then covers only t of them), and "
            f"nothing protects against a malicious hospital sending a poisoned update."
        )
    else:
        parts.append(
            "**No secure aggregation.** The aggregator sees each hospital's individual update "
            "(with the DP guarantee above, if any)."
        )
    parts.append(
        "**Not covered.** The hospital's validation images: their confusion counts"
        + (" and loss sums (for the federation's calibration)" if secagg else "") + " leave the site "
        "only inside the securely aggregated sum" + (" " if secagg else " (here: in the clear) ")
        + "and carry no DP noise; when the federation ends, every hospital receives the federation's validation "
        "images per class (those counts' sums). The calibration this hospital then fits on its own validation "
        "images (its \"uncertain\" threshold and class offsets) stays in its own copy of the model file. "
        "The fact that a hospital takes part, its timing and message sizes."
        " The transport is TLS-encrypted and every site authenticates with its identity key."
    )
    return "\n\n".join(parts)
