"""Commands around the desktop app: open it, and use a federation's model on images
(`classify` runs headless too; it shares every line of its preprocessing with the app).

Each command imports what it needs inside its own function, so that `hemafed --help` and the light commands
start without loading torch, Opacus or Qt (start-up time); the whole CLI is one process per command."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gui", help="open the desktop app (needs the [gui] extra: PySide6)")
    p.add_argument("--config-dir", help="where the app keeps its settings (default: the user's config folder)")
    p.set_defaults(func=_gui)

    p = sub.add_parser("classify", help="predict the cell class of images with a federation's model file")
    p.add_argument("--model", required=True, metavar="MODEL.npz", help="model file saved by a site")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files or folders (a file in a class-named folder is scored against that class)")
    p.add_argument("--json", action="store_true", help="print per-file results (and accuracy per class) as JSON")
    p.add_argument("--csv", metavar="FILE.csv", help="also write one row per file (probability of every class)")
    p.set_defaults(func=_classify)

    p = sub.add_parser("calibrate", help="re-fit a copy of a federation's model file to this hospital's own labelled "
                                         "images (its class offsets and 'uncertain' threshold; nothing is sent)")
    p.add_argument("--model", required=True, metavar="MODEL.npz", help="the federation's model file (or a site's)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="labelled images: folders named after the classes (files elsewhere are skipped); not the "
                        "images you will judge the model on")
    p.add_argument("--out", required=True, metavar="OURS.npz", help="the re-calibrated copy to write")
    p.add_argument("--look-only", action="store_true",
                   help="only choose the look your images are shown in (stain strength, focus and lamp closest to "
                        "the federation's), from at least 100 images with or without labels; nothing is re-fitted")
    p.add_argument("--json", action="store_true", help="print what was fitted as JSON")
    p.set_defaults(func=_calibrate)


def _gui(args: argparse.Namespace) -> int:
    from hemafed.gui.cli import UserFacingError

    try:
        from hemafed.gui.app.main import run_app
    except ImportError as exc:
        raise UserFacingError(f"the desktop app needs PySide6 ({exc}); install with: pip install 'hemafed[gui]'") \
            from exc
    from hemafed.gui.app.system_check import missing_qt_libraries, qt_libraries_message

    missing = missing_qt_libraries()
    if missing:  # Qt would abort with a message that names one of them at best
        raise UserFacingError(qt_libraries_message(missing))
    return run_app(config_dir=args.config_dir)


def _classify(args: argparse.Namespace) -> int:
    from hemafed.core.learning.classify import ModelFileError, classify_paths, load_model_file, percent
    from hemafed.core.learning.confidence import look_text, offsets_text
    from hemafed.gui.cli import UserFacingError

    try:
        model = load_model_file(args.model)
    except ModelFileError as exc:
        raise UserFacingError(str(exc)) from exc
    report = classify_paths(model, args.paths)
    if args.csv:
        report.write_csv(args.csv, model.classes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        cal = model.calibration
        print(f"model: {model.name} (federation {model.federation_id}, round {model.round}) — "
              "research model, not a diagnostic device")
        if cal is None:
            print("probabilities as the model gives them (this model file carries no calibration)")
        else:
            print(f"probabilities calibrated (temperature {cal.temperature:.3g}, from {cal.temperature_from})"
                  + (f"; below {percent(cal.threshold)} an answer is UNCERTAIN (threshold from {cal.images} "
                     "validation images of the hospital that saved the file)" if cal.threshold is not None else
                     "; no 'uncertain' threshold in this file (each hospital fits its own)"))
            print(offsets_text(cal))
            if looked := look_text(cal):
                print(looked)
            if cal.not_a_cell_threshold is not None:
                print("images unlike the federation's (not a single blood cell) are NOT RECOGNISED (threshold "
                      f"flags {cal.not_a_cell_false_alarms:.1%} of {cal.not_a_cell_from or 'the validation images'})")
        for pred in report.predictions:
            if pred.error:
                print(f"{pred.path}: SKIPPED, {pred.error}")
                continue
            top = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[:3]
            answer = ("NOT RECOGNISED as a single blood cell, no class given" if pred.out_of_distribution else
                      f"UNCERTAIN, refer to a person (maybe {pred.predicted})" if pred.uncertain else pred.predicted)
            print(f"{pred.path}: {answer} ({', '.join(f'{c} {percent(p)}' for c, p in top)})")
        for problem in report.problems:
            print(f"skipped: {problem}")
        per_class = report.accuracy_per_class()
        if per_class:
            print(f"\n{'class':<16}{'images':>8}{'correct':>9}{'accuracy':>10}")
            for name, row in per_class.items():
                print(f"{name:<16}{row['images']:>8}{row['correct']:>9}{row['accuracy']:>10.1%}")
            images = sum(row["images"] for row in per_class.values())
            correct = sum(row["correct"] for row in per_class.values())
            if len(per_class) > 1 and images:
                print(f"{'all':<16}{images:>8}{correct:>9}{correct / images:>10.1%}")
    scored = [p for p in report.predictions if not p.error]
    return 0 if scored else 1


def _calibrate(args: argparse.Namespace) -> int:
    from hemafed.core.learning.classify import ModelFileError, load_model_file, percent
    from hemafed.core.learning.confidence import look_text, offsets_text
    from hemafed.core.learning.local_calibration import (
        any_images,
        labelled_images,
        look_only,
        recalibrate,
        save_recalibrated,
        small_sample_note,
    )
    from hemafed.gui.cli import UserFacingError

    try:
        model = load_model_file(args.model)
        if args.look_only:
            images, problems = any_images(model, args.paths)
            result = look_only(model, images)
        else:
            images, labels, problems = labelled_images(model, args.paths)
            result = recalibrate(model, images, labels)
        out = save_recalibrated(model, result, args.out)
    except (ModelFileError, ValueError) as exc:
        raise UserFacingError(str(exc)) from exc
    cal = result.calibration
    if args.look_only:
        if args.json:
            print(json.dumps({"out": str(out), "images": len(images), "skipped": problems, "look": look_text(cal),
                              "calibration": cal.to_dict()}, indent=2))
            return 0
        for problem in problems:
            print(f"skipped: {problem}")
        print(f"{look_text(cal)} ({len(images)} images; the federation's weights and calibration otherwise as they "
              "were)")
        print(f"written to {out} (the federation's file is unchanged; nothing was sent). Keep this copy at your "
              "hospital: it is fitted to your images")
        return 0
    caution = small_sample_note(len(labels))
    if args.json:
        print(json.dumps({"out": str(out), "images": len(labels), "skipped": problems,
                          "class_scores": offsets_text(cal), "look": look_text(cal) or None,
                          "caution": caution or None,
                          "calibration": cal.to_dict()}, indent=2))
        return 0
    for problem in problems:
        print(f"skipped: {problem}")
    if caution:
        print(f"caution: {caution}")
    if look_text(cal):
        print(look_text(cal))
    print(f"re-calibrated on {len(labels)} labelled images: {offsets_text(cal)}; below {percent(cal.threshold)} "
          f"an answer is UNCERTAIN (answers {cal.coverage_target:.0%} of these images)")
    print(f"written to {out} (the federation's file is unchanged; nothing was sent). Keep this copy at your "
          "hospital: it is fitted to your labelled images")
    return 0
