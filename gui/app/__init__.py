"""The hospital desktop app (PySide6): Data, Privacy, Federation and Results pages over
one shared model (`state.AppState`); long work runs in workers that report through
queued signals (`workers`, `site_worker`)."""
