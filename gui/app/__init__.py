"""The hospital desktop app (PySide6): Data, Privacy, Federation and Results pages over
one shared model (`state.AppState`); long work runs in workers that report through
queued signals (`workers`, `site_worker`).

Pages import the engine (torch, the site trainer, the ledger) inside the functions that need it, so the window
opens before any of it is loaded (start-up time, docs/benchmarks.md); the driver's modules are imported once,
off the GUI thread (`site_worker.import_driver_modules`)."""
