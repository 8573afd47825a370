"""File names as text: in the database, in keys, in log lines and in JSON.

A POSIX file name is bytes; Python gives names that are not valid UTF-8 back as str with lone surrogates
(os.fsdecode, "surrogateescape"), which SQLite, strict UTF-8 streams and JSON readers refuse. Each place gets
the form it can hold:

    db_text(path)     database columns (name, src_path, dest_path) and JSONL: valid UTF-8; bytes that are not
                      UTF-8 appear as backslash escapes (b"a\\xff.png" -> "a\\\\xff.png"). UTF-8 names are kept
                      as they are. A file moved to processed/ or quarantine/ is given this name.
    name_key(name)    the name part of a result's key: the name itself when it is valid UTF-8, else "/" and the
                      hex of its bytes. A name never contains "/", so the two forms never meet: one key per name.
    shown(name)       log lines: the name as is when printable, else repr() escaping (a newline or a control
                      character in a name cannot split or forge a log line).
    json_line(obj)    one-off `--json` lines: readable UTF-8, with undecodable name bytes as "\\udcXX" escapes;
                      json.loads() then os.fsencode() gives back the exact name.
"""
from __future__ import annotations

import json
import os
import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def db_text(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text (names that are not UTF-8 get backslash escapes)."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_key(name: str) -> str:
    """The name as it appears in a result key: itself when valid UTF-8, else "/" + hex of its bytes."""
    return name if is_utf8(name) else "/" + os.fsencode(name).hex()


def name_of_key(key: str) -> str:
    """The file name a key was made for (inverse of name_key on the part after the first "/")."""
    part = key.split("/", 1)[1]
    return os.fsdecode(bytes.fromhex(part[1:])) if part.startswith("/") else part


def shown(name: str | os.PathLike) -> str:
    """A name for a log line: unchanged when printable, else repr()-escaped."""
    text = os.fspath(name)
    return text if text.isprintable() else repr(text)


def json_line(obj) -> str:
    """One JSON line, readable UTF-8: lone surrogates (undecodable name bytes) written as \\udcXX escapes."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))
