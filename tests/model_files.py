"""A federation's model file for tests: a head's weights as the aggregator saves them, with a calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def federation_file(path: Path, head, model: str, calibration, federation_id: str = "test") -> Path:
    """`head`'s weights saved as `network.site.save_model_file` does after round 5 of a two-site plan for `model`,
    carrying `calibration` (`core.learning.confidence.Calibration`)."""
    from hemafed.core.learning.models import get_flat_params
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.network.site import save_model_file

    plan = FederationPlan(federation_id=federation_id, model=model, threshold=2, min_sites=2)
    out = save_model_file(path, get_flat_params(head), plan, 5)
    with np.load(out) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        weights = data["weights"]
    meta["calibration"] = calibration.to_dict()
    np.savez(out, weights=weights, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return out
