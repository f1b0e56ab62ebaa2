// The plugin's configuration read as the Rust plugins' serde_json reads it, so that
// this plugin accepts the configurations plugins/enrich accepts and rejects the others
// with the same reasons:
//
// - numbers keep serde_json's types: an integer that fits u64/i64 stays an exact
//   integer, anything else (a fraction, an exponent, `-0`, a huge integer) is an f64,
//   computed the way serde_json computes it and described the way it writes it
//   (`1.0`, `1e+16`, `-0.0`);
// - what serde_json refuses, we refuse: nesting deeper than 127, lone surrogate
//   escapes, numbers out of the f64 range; error messages name the same faults.
//
// (Event properties do not go through this: see json-object.js.)

/** An f64 or integer read by the exact parser, kept as serde_json would write it. */
export class SerdeNumber {
  constructor(text) {
    this.text = text;
  }
  valueOf() {
    return Number(this.text);
  }
  toJSON() {
    return this.valueOf();
  }
}

const MAX_DEPTH = 128; // serde_json's recursion limit: depth 128 is an error
const U64_MAX = 18446744073709551615n;
const U64_MAX_DIV_10 = U64_MAX / 10n;
const U64_MAX_MOD_10 = U64_MAX % 10n;
const I64_MIN_ABS = 9223372036854775808n;
const I32_MAX = 2147483647;
const I32_MIN = -2147483648;
const POW10 = Array.from({ length: 309 }, (_, i) => Number(`1e${i}`));

class JsonError extends Error {}

/** Parses any JSON value exactly as serde_json would (numbers become SerdeNumber). */
export function parseExact(text, options) {
  return new Parser(text, options).parseDocument();
}

/** An f64 as serde_json writes it: shortest round-trip digits, fixed notation for
 * decimal exponents -5..=15 (with `.0` on whole numbers), `d.ddde±x` otherwise. */
export function formatF64(f) {
  if (!Number.isFinite(f)) return "null";
  if (f === 0) return Object.is(f, -0) ? "-0.0" : "0.0";
  let s = String(f);
  let sign = "";
  if (s[0] === "-") {
    sign = "-";
    s = s.slice(1);
  }
  let exp = 0;
  const e = s.indexOf("e");
  if (e !== -1) {
    exp = Number(s.slice(e + 1));
    s = s.slice(0, e);
  }
  const dot = s.indexOf(".");
  const intPart = dot === -1 ? s : s.slice(0, dot);
  let digits = intPart + (dot === -1 ? "" : s.slice(dot + 1));
  let point = intPart.length + exp; // value = 0.<digits> x 10^point
  const lead = digits.length - digits.replace(/^0+/, "").length;
  digits = digits.slice(lead).replace(/0+$/, "");
  point -= lead;
  const de = point - 1; // value = d.ddd x 10^de
  const n = digits.length;
  if (de >= -5 && de <= 15) {
    if (n - 1 <= de) return `${sign}${digits}${"0".repeat(de - n + 1)}.0`;
    if (de >= 0) return `${sign}${digits.slice(0, de + 1)}.${digits.slice(de + 1)}`;
    return `${sign}0.${"0".repeat(-de - 1)}${digits}`;
  }
  const mantissa = n > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${mantissa}e${de < 0 ? "-" : "+"}${Math.abs(de)}`;
}

/** A port of serde_json's reader (without its float_roundtrip feature). */
class Parser {
  constructor(text, { onDuplicateTopLevelKey } = {}) {
    this.s = text;
    this.i = 0;
    this.remainingDepth = MAX_DEPTH;
    this.onDuplicateTopLevelKey = onDuplicateTopLevelKey;
  }

  fail(message) {
    throw new JsonError(`${message} at character ${this.i}`);
  }

  peek() {
    return this.i < this.s.length ? this.s.charCodeAt(this.i) : -1;
  }

  skipWhitespace() {
    for (;;) {
      const c = this.peek();
      if (c === 0x20 || c === 0x0a || c === 0x09 || c === 0x0d) this.i++;
      else return c;
    }
  }

  parseDocument() {
    const value = this.parseValue();
    if (this.skipWhitespace() !== -1) this.fail("trailing characters");
    return value;
  }

  parseValue() {
    const c = this.skipWhitespace();
    switch (c) {
      case -1:
        return this.fail("EOF while parsing a value");
      case 0x7b: // {
        return this.nested(() => this.parseObjectBody());
      case 0x5b: // [
        return this.nested(() => this.parseArrayBody());
      case 0x22: // "
        return this.parseString();
      case 0x74:
        return this.literal("true", true);
      case 0x66:
        return this.literal("false", false);
      case 0x6e:
        return this.literal("null", null);
      default:
        if (c === 0x2d || (c >= 0x30 && c <= 0x39)) return this.parseNumber();
        return this.fail("expected value");
    }
  }

  nested(body) {
    if (--this.remainingDepth === 0) this.fail("recursion limit exceeded");
    this.i++;
    const value = body();
    this.remainingDepth++;
    return value;
  }

  literal(word, value) {
    if (this.s.startsWith(word, this.i)) {
      this.i += word.length;
      return value;
    }
    return this.fail("expected ident");
  }

  parseObjectBody() {
    const obj = {};
    const topLevel = this.remainingDepth === MAX_DEPTH - 1;
    if (this.skipWhitespace() === 0x7d) {
      this.i++;
      return obj;
    }
    for (;;) {
      if (this.skipWhitespace() !== 0x22) this.fail("key must be a string");
      const key = this.parseString();
      if (this.skipWhitespace() !== 0x3a) this.fail("expected `:`");
      this.i++;
      const value = this.parseValue();
      if (topLevel && this.onDuplicateTopLevelKey && Object.hasOwn(obj, key)) this.onDuplicateTopLevelKey(key);
      Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
      const c = this.skipWhitespace();
      this.i++;
      if (c === 0x7d) return obj;
      if (c !== 0x2c) {
        this.i--;
        this.fail("expected `,` or `}`");
      }
    }
  }

  parseArrayBody() {
    const arr = [];
    if (this.skipWhitespace() === 0x5d) {
      this.i++;
      return arr;
    }
    for (;;) {
      arr.push(this.parseValue());
      const c = this.skipWhitespace();
      this.i++;
      if (c === 0x5d) return arr;
      if (c !== 0x2c) {
        this.i--;
        this.fail("expected `,` or `]`");
      }
    }
  }

  parseString() {
    this.i++; // the opening quote
    let out = "";
    let start = this.i;
    for (;;) {
      const c = this.peek();
      if (c === -1) this.fail("EOF while parsing a string");
      if (c === 0x22) {
        out += this.s.slice(start, this.i);
        this.i++;
        return out;
      }
      if (c < 0x20) this.fail("control character (\\u0000-\\u001F) found while parsing a string");
      if (c !== 0x5c) {
        this.i++;
        continue;
      }
      out += this.s.slice(start, this.i);
      this.i++;
      out += this.parseEscape();
      start = this.i;
    }
  }

  parseEscape() {
    const c = this.s[this.i++];
    switch (c) {
      case '"':
        return '"';
      case "\\":
        return "\\";
      case "/":
        return "/";
      case "b":
        return "\b";
      case "f":
        return "\f";
      case "n":
        return "\n";
      case "r":
        return "\r";
      case "t":
        return "\t";
      case "u": {
        const n = this.hex4();
        if (n >= 0xdc00 && n <= 0xdfff) this.fail("lone leading surrogate in hex escape");
        if (n < 0xd800 || n > 0xdbff) return String.fromCharCode(n);
        if (this.s[this.i] !== "\\" || this.s[this.i + 1] !== "u") {
          this.i++;
          this.fail("unexpected end of hex escape");
        }
        this.i += 2;
        const n2 = this.hex4();
        if (n2 < 0xdc00 || n2 > 0xdfff) this.fail("lone leading surrogate in hex escape");
        return String.fromCharCode(n, n2);
      }
      default:
        return this.fail(c === undefined ? "EOF while parsing a string" : "invalid escape");
    }
  }

  hex4() {
    const h = this.s.slice(this.i, this.i + 4);
    if (h.length < 4) this.fail("EOF while parsing a string");
    if (!/^[0-9a-fA-F]{4}$/.test(h)) this.fail("invalid escape");
    this.i += 4;
    return parseInt(h, 16);
  }

  isDigit() {
    const c = this.peek();
    return c >= 0x30 && c <= 0x39 ? c - 0x30 : -1;
  }

  // serde_json's parse_integer / parse_number.
  parseNumber() {
    let positive = true;
    if (this.peek() === 0x2d) {
      positive = false;
      this.i++;
    }
    const first = this.isDigit();
    if (first === -1) this.fail(this.peek() === -1 ? "EOF while parsing a value" : "invalid number");
    this.i++;
    let significand = BigInt(first);
    if (first === 0) {
      if (this.isDigit() !== -1) this.fail("invalid number");
    } else {
      for (let d; (d = this.isDigit()) !== -1; ) {
        const digit = BigInt(d);
        if (significand >= U64_MAX_DIV_10 && (significand > U64_MAX_DIV_10 || digit > U64_MAX_MOD_10)) {
          return this.f64(this.parseLongInteger(positive, significand));
        }
        this.i++;
        significand = significand * 10n + digit;
      }
    }
    const c = this.peek();
    if (c === 0x2e) return this.f64(this.parseDecimal(positive, significand, 0));
    if (c === 0x65 || c === 0x45) return this.f64(this.parseExponent(positive, significand, 0));
    if (positive) return new SerdeNumber(significand.toString());
    if (significand === 0n) return this.f64(-0);
    if (significand <= I64_MIN_ABS) return new SerdeNumber(`-${significand}`);
    return this.f64(-Number(significand));
  }

  f64(f) {
    return new SerdeNumber(formatF64(f));
  }

  parseLongInteger(positive, significand) {
    let exponent = 0;
    for (;;) {
      const c = this.peek();
      if (c >= 0x30 && c <= 0x39) {
        this.i++;
        exponent++;
      } else if (c === 0x2e) {
        return this.parseDecimal(positive, significand, exponent);
      } else if (c === 0x65 || c === 0x45) {
        return this.parseExponent(positive, significand, exponent);
      } else {
        return this.f64FromParts(positive, significand, exponent);
      }
    }
  }

  parseDecimal(positive, significand, exponentBeforePoint) {
    this.i++; // '.'
    let exponentAfterPoint = 0;
    for (let d; (d = this.isDigit()) !== -1; ) {
      const digit = BigInt(d);
      if (significand >= U64_MAX_DIV_10 && (significand > U64_MAX_DIV_10 || digit > U64_MAX_MOD_10)) {
        while (this.isDigit() !== -1) this.i++;
        const exponent = exponentBeforePoint + exponentAfterPoint;
        const c = this.peek();
        if (c === 0x65 || c === 0x45) return this.parseExponent(positive, significand, exponent);
        return this.f64FromParts(positive, significand, exponent);
      }
      this.i++;
      significand = significand * 10n + digit;
      exponentAfterPoint--;
    }
    if (exponentAfterPoint === 0) this.fail(this.peek() === -1 ? "EOF while parsing a value" : "invalid number");
    const exponent = exponentBeforePoint + exponentAfterPoint;
    const c = this.peek();
    if (c === 0x65 || c === 0x45) return this.parseExponent(positive, significand, exponent);
    return this.f64FromParts(positive, significand, exponent);
  }

  parseExponent(positive, significand, startingExp) {
    this.i++; // 'e'
    let positiveExp = true;
    if (this.peek() === 0x2b) this.i++;
    else if (this.peek() === 0x2d) {
      positiveExp = false;
      this.i++;
    }
    const first = this.isDigit();
    if (first === -1) this.fail(this.peek() === -1 ? "EOF while parsing a value" : "invalid number");
    this.i++;
    let exp = first;
    for (let d; (d = this.isDigit()) !== -1; ) {
      this.i++;
      if (exp >= 214748364 && (exp > 214748364 || d > 7)) {
        if (significand !== 0n && positiveExp) this.fail("number out of range");
        while (this.isDigit() !== -1) this.i++;
        return positive ? 0 : -0;
      }
      exp = exp * 10 + d;
    }
    const finalExp = Math.min(I32_MAX, Math.max(I32_MIN, positiveExp ? startingExp + exp : startingExp - exp));
    return this.f64FromParts(positive, significand, finalExp);
  }

  f64FromParts(positive, significand, exponent) {
    let f = Number(significand);
    for (;;) {
      const index = Math.abs(exponent);
      if (index < POW10.length) {
        if (exponent >= 0) {
          f *= POW10[index];
          if (!Number.isFinite(f)) this.fail("number out of range");
        } else {
          f /= POW10[index];
        }
        break;
      }
      if (f === 0) break;
      if (exponent >= 0) this.fail("number out of range");
      f /= 1e308;
      exponent += 308;
    }
    return positive ? f : -f;
  }
}
