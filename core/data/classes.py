"""The BloodMNIST class list, in label order."""

from __future__ import annotations

BLOODMNIST_CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)


def normalise_class_name(name: str) -> str:
    """Folder and manifest labels compare case- and separator-insensitively."""
    return name.strip().lower().replace(" ", "_").replace("-", "_")
