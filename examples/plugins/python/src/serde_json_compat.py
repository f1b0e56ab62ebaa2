"""The plugin's configuration read as the Rust plugins' serde_json reads it.

So that this plugin accepts the configurations plugins/enrich accepts and rejects the
others for the same faults:

- numbers keep serde_json's types: an integer that fits u64/i64 stays an exact integer,
  anything else (a fraction, an exponent, ``-0``, a huge integer) is an f64 computed the
  way serde_json computes it and described the way it writes it (``1.0``, ``1e+16``,
  ``0.00001``, ``-0.0``);
- what serde_json refuses, this refuses: ``NaN``/``Infinity``, nesting deeper than 127,
  lone surrogate escapes, numbers out of the f64 range.

(Event properties do not go through this: see json_object.py.)
"""

import json
import math
import re

MAX_DEPTH = 128  # serde_json's recursion limit: depth 128 is an error
U64_MAX = 2**64 - 1
I64_MIN_ABS = 2**63
I32_MAX = 2**31 - 1
I32_MIN = -(2**31)
POW10 = [float(f"1e{i}") for i in range(309)]

_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([-+]?)(\d+))?")
# Integers that Python's int() would read differently from serde_json: -0 and
# integers too long for u64/i64 (which serde_json reads as f64).
_INT_RISK = re.compile(r"-0|\d{19}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Every escape, left to right, so that `\\ud800` in the text reads as an escaped
# backslash, not as a surrogate escape.
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.S)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


class JsonError(ValueError):
    """The text is not JSON that serde_json would accept."""


class _Parse:
    saw_float = False


def _float(lexeme):
    _Parse.saw_float = True
    return serde_number(lexeme)


def _int(lexeme):
    value = serde_number(lexeme)
    if isinstance(value, float):
        _Parse.saw_float = True
    return value


def _constant(name):
    raise JsonError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_float=_float, parse_constant=_constant)
_DECODER_INTS = json.JSONDecoder(parse_float=_float, parse_int=_int, parse_constant=_constant)


class Pairs(list):
    """A JSON object read by ``loads(..., pairs=True)``: its ``(key, value)`` pairs, in
    order, duplicates included."""


_DECODER_PAIRS = json.JSONDecoder(
    parse_float=_float, parse_int=_int, parse_constant=_constant, object_pairs_hook=Pairs
)


def loads(text, pairs=False):
    """Reads any JSON value as serde_json would. Returns ``(value, has_floats)``.

    With ``pairs``, objects come as ``Pairs`` (to see duplicate keys) instead of dicts."""
    # Checked before parsing: deep recursion in the parser could overflow the
    # sandbox's stack, where serde_json stops at its limit.
    if text.count("{") + text.count("[") >= MAX_DEPTH and _nesting(text) >= MAX_DEPTH:
        raise JsonError("recursion limit exceeded")
    # Checked in the text, not in the result: a string that a repeated key replaces
    # still makes serde_json fail.
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate_escape(text):
        raise JsonError("lone surrogate in hex escape")
    _Parse.saw_float = False
    if pairs:
        decoder = _DECODER_PAIRS
    else:
        decoder = _DECODER_INTS if _INT_RISK.search(text) else _DECODER
    try:
        value = decoder.decode(text)
    except json.JSONDecodeError as e:
        raise JsonError(str(e)) from None
    return value, _Parse.saw_float


def _nesting(text):
    """The deepest nesting of arrays and objects in (valid) JSON text."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub('""', text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _has_lone_surrogate_escape(text):
    """Whether (valid) JSON text has a ``\\u`` escape of an unpaired surrogate (a pair is
    a leading ``\\ud800``-``\\udbff`` escape followed at once by a trailing
    ``\\udc00``-``\\udfff`` one)."""
    lead_end = None  # where the last unpaired leading surrogate's escape ended
    for m in _ESCAPE.finditer(text):
        code = int(m.group(1), 16) if m.group(1) else None
        if lead_end is not None:
            if m.start() != lead_end or code is None or not 0xDC00 <= code <= 0xDFFF:
                return True
            lead_end = None
        elif code is not None and 0xD800 <= code <= 0xDBFF:
            lead_end = m.end()
        elif code is not None and 0xDC00 <= code <= 0xDFFF:
            return True
    return lead_end is not None


def format_f64(f):
    """An f64 as serde_json writes it: shortest round-trip digits, fixed notation for
    decimal exponents -5..=15 (with ``.0`` on whole numbers), ``d.ddde±x`` otherwise."""
    if not math.isfinite(f):
        return "null"
    if f == 0:
        return "-0.0" if math.copysign(1.0, f) < 0 else "0.0"
    s = repr(f)
    sign = ""
    if s[0] == "-":
        sign, s = "-", s[1:]
    mantissa, _, exp = s.partition("e")
    int_part, _, frac = mantissa.partition(".")
    digits = int_part + frac
    point = len(int_part) + (int(exp) if exp else 0)  # value = 0.<digits> x 10^point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    de = point - 1  # value = d.ddd x 10^de
    n = len(digits)
    if -5 <= de <= 15:
        if n - 1 <= de:
            return f"{sign}{digits}{'0' * (de - n + 1)}.0"
        if de >= 0:
            return f"{sign}{digits[:de + 1]}.{digits[de + 1:]}"
        return f"{sign}0.{'0' * (-de - 1)}{digits}"
    m = f"{digits[0]}.{digits[1:]}" if n > 1 else digits
    return f"{sign}{m}e{'-' if de < 0 else '+'}{abs(de)}"


def _overflows_u64(significand, digit):
    return significand >= U64_MAX // 10 and (significand > U64_MAX // 10 or digit > U64_MAX % 10)


def serde_number(lexeme):
    """A JSON number as serde_json reads it (without its float_roundtrip feature):
    ``int`` when it is an integer that fits u64 (or i64 when negative), else ``float``."""
    m = _NUMBER.fullmatch(lexeme)
    if m is None:
        raise JsonError(f"invalid number {lexeme!r}")
    minus, int_digits, frac_digits, exp_sign, exp_digits = m.groups()
    positive = not minus
    if frac_digits is None and exp_digits is None and len(int_digits) <= 18:
        value = int(int_digits)  # < 10^18: no overflow
        if positive:
            return value
        return -value if value else -0.0

    # parse_integer: digits while they fit u64, then parse_long_integer.
    significand = 0
    exponent = 0
    overflowed = False
    for k, ch in enumerate(int_digits):
        digit = ord(ch) - 48
        if _overflows_u64(significand, digit):
            exponent = len(int_digits) - k
            overflowed = True
            break
        significand = significand * 10 + digit

    if not overflowed and frac_digits is None and exp_digits is None:
        if positive:
            return significand
        if significand == 0:
            return -0.0
        if significand <= I64_MIN_ABS:
            return -significand
        return -float(significand)

    # parse_decimal: digits while they fit u64; the rest is ignored.
    if frac_digits is not None:
        for ch in frac_digits:
            digit = ord(ch) - 48
            if _overflows_u64(significand, digit):
                break
            significand = significand * 10 + digit
            exponent -= 1

    # parse_exponent
    if exp_digits is not None:
        positive_exp = exp_sign != "-"
        exp = ord(exp_digits[0]) - 48
        for ch in exp_digits[1:]:
            digit = ord(ch) - 48
            if exp >= I32_MAX // 10 and (exp > I32_MAX // 10 or digit > I32_MAX % 10):
                if significand != 0 and positive_exp:
                    raise JsonError("number out of range")
                return 0.0 if positive else -0.0
            exp = exp * 10 + digit
        exponent = exponent + exp if positive_exp else exponent - exp
        exponent = max(I32_MIN, min(I32_MAX, exponent))

    return _f64_from_parts(positive, significand, exponent)


def _f64_from_parts(positive, significand, exponent):
    f = float(significand)
    while True:
        index = abs(exponent)
        if index < len(POW10):
            if exponent >= 0:
                f *= POW10[index]
                if math.isinf(f):
                    raise JsonError("number out of range")
            else:
                f /= POW10[index]
            break
        if f == 0:
            break
        if exponent >= 0:
            raise JsonError("number out of range")
        f /= 1e308
        exponent += 308
    return f if positive else -f
