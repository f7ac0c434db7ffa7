"""Untrusted text made safe for the tokenizers and for UTF-8 files."""
from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """`text` with surrogate code points replaced by U+FFFD.

    JSON escapes such as "\\ud800" and undecodable command-line bytes (surrogateescape) give Python
    strings that cannot be encoded as UTF-8: the tokenizers refuse them with a TypeError and the
    passage store could not write them. Invalid UTF-8 bytes in files get the same U+FFFD on reading.
    """
    return _SURROGATE.sub("\ufffd", text)
