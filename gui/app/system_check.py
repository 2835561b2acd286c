"""Before Qt starts on a Linux desktop: the system libraries its X11 (xcb) platform plugin loads. Without
them Qt aborts ("could not load the Qt platform plugin xcb") naming one of them at best; the app names
them all, with the command that installs them. No Qt import here: it runs before Qt does."""

from __future__ import annotations

import ctypes.util
import os
import sys

# library name for ctypes.util.find_library → the Debian/Ubuntu package that ships it (Qt 6.5+, xcb plugin)
QT_XCB_LIBRARIES = {
    "xcb-cursor": "libxcb-cursor0",
    "xcb-icccm": "libxcb-icccm4",
    "xcb-keysyms": "libxcb-keysyms1",
    "xcb-image": "libxcb-image0",
    "xcb-render-util": "libxcb-render-util0",
    "xcb-randr": "libxcb-randr0",
    "xcb-shape": "libxcb-shape0",
    "xcb-xfixes": "libxcb-xfixes0",
    "xcb-xkb": "libxcb-xkb1",
    "xkbcommon-x11": "libxkbcommon-x11-0",
}


def missing_qt_libraries(environ: dict[str, str] | None = None, find=ctypes.util.find_library) -> list[str]:
    """The packages of the libraries Qt's xcb plugin needs and this Linux desktop lacks ([] elsewhere: another
    platform, a Wayland or offscreen session, or nothing missing)."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or not env.get("DISPLAY"):
        return []
    if env.get("QT_QPA_PLATFORM", "xcb").split(":")[0] != "xcb":
        return []
    return [package for name, package in QT_XCB_LIBRARIES.items() if find(name) is None]


def qt_libraries_message(missing: list[str]) -> str:
    return ("the desktop app cannot start: this computer lacks system libraries that Qt needs to open windows "
            f"({', '.join(missing)}). Install them (Debian/Ubuntu: `sudo apt install {' '.join(missing)}`) or ask "
            "your IT department; the headless commands (hemafed site, scan, classify) work without them")
