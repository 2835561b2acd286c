"""The plan review in words: what the aggregator asks of a site, as the operator reads it before round 1.

The app's review dialog (`gui.app.plan_dialog`) shows these rows; the site driver records them with the plan when
the operator accepts it (`core.privacy.store.SiteStore.record_plan_acceptance`), and the site's privacy report
prints them (`network.site_report`). The texts use a little HTML (<b>, <br>)."""

from __future__ import annotations


def plan_rows(plan, privacy, epsilon_budget: float, epsilon_per_round: tuple[float, ...]) -> list[tuple[str, str]]:
    from hemafed.core.learning.models import MODELS  # torch: only once a plan arrives, never at start-up

    model = MODELS.get(plan.model)
    fedsgd = plan.algorithm == "fedsgd"
    after = ""  # ε after the plan has its own row
    rows = [
        ("federation", plan.federation_id),
        ("model", f"{plan.model}" + (f" — {model.description}" if model else "")),
        ("cell classes", ", ".join(plan.classes)),
        ("rounds", str(plan.rounds)),
    ]
    if fedsgd:
        n = plan.center_rounds_used
        first, it = ("Round 1", "it is") if n == 1 else (f"Each of rounds 1–{n}", "each is")
        rows.append(("training per round",
                     f"<b>one DP-SGD step</b> (DP-FedSGD): each round this site picks a random sample of its "
                     f"images (each image with probability q = {plan.sample_rate:g}) and sends one clipped, "
                     "noised sum of their gradients; no local epochs"
                     + (f". <b>{first}</b> instead sends one clipped, noised sum of the sampled images' "
                        "<b>features</b>, from which the federation learns their average (the model subtracts "
                        f"it); {it} protected and counted exactly like a training round"
                        if model and model.centred else "")))
    else:
        rows.append(("training per round", f"<b>{plan.local_epochs} local epoch(s)</b> (FedAvg), batch size "
                                           f"{plan.batch_size}, learning rate {plan.lr:g}"))
    if epsilon_per_round and plan.dp:
        rows.append(("ε after the plan", f"<b>{epsilon_per_round[-1]:.3g}</b> of this site's budget "
                                         f"{epsilon_budget:g} after the last round (ε is spent by every round "
                                         "and never comes back; smaller is stronger protection)"))
    rows.append(("per-image gradient clip", f"{plan.clip_norm:g} (no single image can move the model by more)"))
    if not plan.dp or privacy is None:
        rows.append(("differential privacy", "OFF — updates carry no privacy guarantee"))
    elif fedsgd and plan.dp_mode == "distributed":
        c = plan.dp_colluders
        rows += [
            ("differential privacy", "<b>distributed</b>: each hospital adds only a share of the noise, inside "
             f"secure aggregation; the sum the aggregator can open (of at least {plan.threshold} hospitals) carries "
             "the full "
             f"noise σ = {plan.noise_multiplier:.3g}, the same for every hospital{after}."),
            ("protected against", "the aggregator, the other hospitals and anyone using the model, "
             "<b>assuming</b> the aggregator follows the protocol (it never opens one hospital's contribution) "
             f"and at most {c} hospital(s) pool their noise shares with it. If more do, the noise protecting "
             "the others is smaller. A hospital that wants to rely on nobody can require local DP "
             "(it then refuses this plan)."),
            ("t, c", f"t = {plan.threshold}: the fewest hospitals whose sum is ever opened; c = {c}: hospitals "
                     "assumed able to pool their noise shares"),
            ("σ, q", f"noise multiplier σ = {plan.noise_multiplier:.3g} (set by the federation for all "
                     f"hospitals); sampling rate q = {plan.sample_rate:g}; δ = {privacy.delta:.2g}"),
        ]
    elif fedsgd:
        rows.append(("differential privacy", f"<b>local</b>: this site adds the full noise σ = "
                     f"{plan.noise_multiplier:.3g} itself before anything leaves; it trusts no one{after}."))
        rows.append(("σ, q", f"σ = {plan.noise_multiplier:.3g} (the federation's), q = {plan.sample_rate:g}, "
                             f"δ = {privacy.delta:.2g}"))
    else:
        rows.append(("differential privacy", f"<b>local</b>: this site adds noise σ = {privacy.sigma:.3f} itself, "
                     f"fitted to its budget ε = {epsilon_budget:g} at δ = {privacy.delta:.2g}{after}"))
    rows += [
        ("δ", f"{plan.delta:g} (this site uses min(δ, 1/number of images))"),
        ("secure aggregation", f"on, threshold t = {plan.threshold} of at least {plan.min_sites} sites"
         if plan.secagg else "OFF — the aggregator sees this site's update"),
        ("validation split", f"{plan.val_fraction:.0%} of each class kept here to measure the model"),
    ]
    return rows


def sees_text(plan) -> str:
    if plan.secagg and plan.algorithm == "fedsgd":
        from hemafed.core.learning.models import MODELS

        model = MODELS.get(plan.model)
        sees = (f"each round only the <b>sum</b> over at least {plan.threshold} hospitals of their clipped, noised "
                "gradient sums "
                + (("(in round 1, feature sums) " if plan.center_rounds_used == 1 else
                    f"(in rounds 1–{plan.center_rounds_used}, feature sums) ") if model and model.centred else "")
                + "and validation counts and loss sums, and which sites are connected")
    elif plan.secagg:
        sees = ("only the <b>sum</b> of the sites' masked, noised updates and validation counts and loss sums of "
                "each round, "
                "and which sites are connected")
    else:
        sees = "<b>this site's own update</b> (noised if DP is on) and its validation counts"
    never = ("images, labels, file names, one hospital's own update, or this site's number of images"
             if plan.secagg else "images, labels or file names (it does see this site's sample count)")
    return f"<b>The aggregator will see:</b> {sees}.<br><b>It will never see:</b> {never}."
