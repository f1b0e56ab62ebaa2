"""A JSON object kept as text, read and changed the way weir's Rust SDK does it
(sdk-guest/src/lib.rs, ``JsonObject``), so that this plugin returns the same bytes as
plugins/enrich for the same event:

- reading a member scans the text's top level and parses only that member's value;
- setting a member splices its new value into the text: every other member keeps its
  bytes (numbers, spacing, key order) and its place; a new member goes after the last
  one;
- a key that appears more than once is read and replaced at its last occurrence;
- text that is not a JSON object reads as ``{}`` and becomes one when a member is set.
"""

import json

_WS = " \t\n\r"
_VALUE_END = ",}] \t\n\r"


def _dumps(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class JsonObject:
    def __init__(self, text):
        self.text = text
        self._members = scan_object(text)

    def get(self, key):
        """The last member named ``key``, parsed, or ``None`` if absent (or unreadable)."""
        member = self._find(key)
        if member is None:
            return None
        try:
            return json.loads(self.text[member[3]:member[4]])
        except ValueError:
            return None

    def set(self, key, value):
        """Sets member ``key`` to ``value`` (str, bool, None, int, or lists and dicts of
        those: what json.dumps writes as serde_json would)."""
        if self._members is None:
            self.text = "{}"
            self._members = []
        text = _dumps(value)
        member = self._find(key)
        if member is not None:
            self.text = self.text[:member[3]] + text + self.text[member[4]:]
        else:
            if self._members:
                at, prefix = self._members[-1][4], ","
            else:
                at, prefix = len(self.text.rstrip(_WS)) - 1, ""
            self.text = self.text[:at] + prefix + _dumps(key) + ":" + text + self.text[at:]
        self._members = scan_object(self.text)

    def _find(self, key):
        for member in reversed(self._members or ()):
            key_start, key_end, escaped = member[0], member[1], member[2]
            raw = self.text[key_start:key_end]
            if (json.loads(f'"{raw}"') if escaped else raw) == key:
                return member
        return None


def scan_object(s):
    """The top-level members of a JSON object's text, as tuples ``(key_start, key_end,
    key_escaped, value_start, value_end)`` (the key without its quotes), or ``None`` if
    the text is not an object. Values are skipped, not checked."""
    n = len(s)
    i = _skip_ws(s, 0)
    if i >= n or s[i] != "{":
        return None
    i = _skip_ws(s, i + 1)
    members = []
    if i < n and s[i] == "}":
        i += 1
    else:
        while True:
            if i >= n or s[i] != '"':
                return None
            key = _skip_string(s, i)
            if key is None:
                return None
            key_end, escaped = key
            key_start = i + 1
            i = _skip_ws(s, key_end)
            if i >= n or s[i] != ":":
                return None
            value_start = _skip_ws(s, i + 1)
            value_end = _skip_value(s, value_start)
            if value_end is None:
                return None
            members.append((key_start, key_end - 1, escaped, value_start, value_end))
            i = _skip_ws(s, value_end)
            if i < n and s[i] == ",":
                i = _skip_ws(s, i + 1)
            elif i < n and s[i] == "}":
                i += 1
                break
            else:
                return None
    return members if _skip_ws(s, i) == n else None


def _skip_ws(s, i):
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _skip_string(s, i):
    """From the opening quote at ``i``: (the index after the closing quote, whether the
    string has escapes), or ``None`` if it does not end."""
    escaped = False
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == '"':
            return i + 1, escaped
        if c == "\\":
            escaped = True
            i += 1
        i += 1
    return None


def _skip_value(s, i):
    """From the first character of a value at ``i``: the index after it, or ``None``."""
    n = len(s)
    if i >= n:
        return None
    c = s[i]
    if c == '"':
        end = _skip_string(s, i)
        return None if end is None else end[0]
    if c in "{[":
        depth = 0
        while i < n:
            d = s[i]
            if d == '"':
                end = _skip_string(s, i)
                if end is None:
                    return None
                i = end[0]
                continue
            if d in "{[":
                depth += 1
            elif d in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    start = i
    while i < n and s[i] not in _VALUE_END:
        i += 1
    return i if i > start else None
