"""Text that came from a peer, made safe to put in a log line or on a screen.

A peer (a site's `plan_reject` reasons, the aggregator's error message) controls these
strings: unescaped, a newline or an ANSI escape lets it forge log lines or repaint a
terminal, and a megabyte of text floods both. `safe_text` keeps printable characters,
escapes everything else the way `repr` does, and caps the length.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200


def safe_text(value: object, limit: int = DEFAULT_LIMIT, *, escape_backslash: bool = True) -> str:
    """`value` as one printable line of at most `limit` characters (a cut ends in '…').

    Control, format and separator characters (newlines, ESC, bidi overrides, U+2028…) become
    `\\xNN` / `\\uNNNN`; backslashes are doubled (unless `escape_backslash` is off, for text
    that is ours and only needs its control characters neutralised), so an escape cannot be
    faked. Non-strings are shown by `repr` (an int too large to print shows as its type only).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if not isinstance(value, str):
        try:
            value = repr(value)
        except (ValueError, RecursionError):  # e.g. an int over Python's digit limit
            value = f"<{type(value).__name__}>"
    out: list[str] = []
    size = 0
    for ch in value[: limit + 1]:  # escaping only grows text: never look further than needed
        if ch == "\\" and escape_backslash:
            piece = "\\\\"
        elif not ch.isprintable():  # Unicode categories C* and Z*, except the ASCII space
            code = ord(ch)
            piece = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
        else:
            piece = ch
        if size + len(piece) > limit:
            return "".join(out)[: limit - 1] + "…"
        out.append(piece)
        size += len(piece)
    text = "".join(out)
    if len(value) > limit:
        return text[: limit - 1] + "…"
    return text


def safe_list(values: object, limit: int = DEFAULT_LIMIT, max_items: int = 20) -> list[str]:
    """A peer's list of reasons as at most `max_items` safe lines; anything else becomes one line."""
    if isinstance(values, list | tuple):
        return [safe_text(v, limit) for v in values[:max_items]]
    return [safe_text(values, limit)]
