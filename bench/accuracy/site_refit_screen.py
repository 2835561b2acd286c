"""Screen: each simulated hospital's own re-fit when the federation ends, on its validation split — the whole final
layer (`core.learning.head_refit`) against the class offsets the sites fit today (research script, issue 18;
docs/appearance-remedies.md, tenth pass).

For the six runs of the seventh pass (results/appear/{same,shifted}-s{0,1,2}: every hospital alike, or each in its own
look), each hospital re-fits the run's final model file on its own validation split (as its site holds it, in its
look) and is judged on 500 images of BloodMNIST's validation split rendered in its look. Validation only.

    python -m bench.accuracy.site_refit_screen
"""

import json
from pathlib import Path

import numpy as np
import torch

from hemafed.core.data.appearance import apply_look, hospital_looks
from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.learning.class_offsets import refit_offsets
from hemafed.core.learning.classify import load_model_file
from hemafed.core.learning.head_refit import refit_head
from hemafed.core.learning.models import build_model, set_flat_params, split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.network.sim.simulate import SimulationOptions, hospitals


def main() -> None:
    torch.set_num_threads(2)
    val = load_splits(locate(None, size=64))["val"]
    keep = np.random.default_rng(3).permutation(len(val.labels))[:500]
    jy = np.asarray(val.labels).reshape(-1)[keep]
    rows = []
    for kind in ("same", "shifted"):
        for s in range(3):
            h = hospitals(SimulationOptions(seed=s, appearance=kind, quiet=True))
            plan = h.plan
            net = build_model(plan.model, 8)
            head = split_features(net)[1]
            path = Path(f"results/appear/{kind}-s{s}/final_model.npz")
            cal = load_model_file(path).calibration
            set_flat_params(head, np.load(path)["weights"])
            looks = hospital_looks(10, s)
            W = head.linear.weight.detach().double().numpy()
            b = head.linear.bias.detach().double().numpy()
            mix, T = np.asarray(cal.federation_classes), cal.temperature
            for i, (name, d) in enumerate(sorted(h.site_data().items())):
                with torch.no_grad():
                    fv = model_inputs(plan, net, d.val_images, "eval")
                    zv = head.centred_inputs(fv).double().numpy()
                    jimg = val.images[keep] if kind == "same" else apply_look(val.images[keep], looks[i])
                    zj = head.centred_inputs(model_inputs(plan, net, jimg, "eval")).double().numpy()
                lv, lj = zv @ W.T + b, zj @ W.T + b
                yv = np.asarray(d.val_labels).reshape(-1)
                off = refit_offsets(lv, yv, mix, T)
                acc_rel = float((lj.argmax(1) == jy).mean())
                acc_off = float(((lj + (np.asarray(off.offsets) if off.kept else 0)).argmax(1) == jy).mean())
                hf = refit_head(zv, W, b, yv, mix, T)
                acc_head = float(((zj @ hf.weight.T + hf.bias).argmax(1) == jy).mean()) if hf.kept else acc_off
                rows.append(dict(kind=kind, seed=s, site=name, n=len(yv), released=acc_rel, offsets=acc_off,
                                 head=acc_head, head_kept=hf.kept))
                print(json.dumps(rows[-1]), flush=True)
    for kind in ("same", "shifted"):
        r = [x for x in rows if x["kind"] == kind]
        print(kind, {k: round(100 * float(np.mean([x[k] for x in r])), 2) for k in ("released", "offsets", "head")},
              "worst", {k: round(100 * min(x[k] for x in r), 2) for k in ("released", "offsets", "head")},
              "layer kept", sum(x["head_kept"] for x in r), "of", len(r))


if __name__ == "__main__":
    main()
