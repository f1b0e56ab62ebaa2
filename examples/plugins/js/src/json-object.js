// A JSON object kept as text, read and changed the way weir's Rust SDK does it
// (sdk-guest/src/lib.rs, `JsonObject`), so that this plugin returns the same bytes as
// plugins/enrich for the same event:
//
// - reading a member scans the text's top level and parses only that member's value;
// - setting a member splices its new value into the text: every other member keeps its
//   bytes (numbers, spacing, key order) and its place; a new member goes after the
//   last one;
// - a key that appears more than once is read and replaced at its last occurrence;
// - text that is not a JSON object reads as `{}` and becomes one when a member is set.

const WS = new Set([0x20, 0x09, 0x0a, 0x0d]);
const VALUE_END = new Set([0x2c, 0x7d, 0x5d, 0x20, 0x09, 0x0a, 0x0d]); // , } ] and whitespace

export class JsonObject {
  constructor(text) {
    this.text = text;
    this.members = scanObject(text);
  }

  /** The last member named `key`, parsed, or `undefined`. */
  get(key) {
    const m = this.find(key);
    if (m === undefined) return undefined;
    try {
      return JSON.parse(this.text.slice(m.valueStart, m.valueEnd));
    } catch {
      return undefined;
    }
  }

  /** Sets member `key` to `value` (anything JSON.stringify writes as serde_json would:
   * strings, booleans, null, safe integers, arrays and objects of those). */
  set(key, value) {
    if (this.members === null) this.text = "{}";
    const json = JSON.stringify(value);
    const m = this.find(key);
    if (m !== undefined) {
      this.text = this.text.slice(0, m.valueStart) + json + this.text.slice(m.valueEnd);
    } else {
      const members = this.members ?? [];
      const at = members.length > 0 ? members[members.length - 1].valueEnd : this.text.trimEnd().length - 1;
      const member = (members.length > 0 ? "," : "") + JSON.stringify(key) + ":" + json;
      this.text = this.text.slice(0, at) + member + this.text.slice(at);
    }
    this.members = scanObject(this.text);
  }

  find(key) {
    const members = this.members ?? [];
    for (let i = members.length - 1; i >= 0; i--) {
      const m = members[i];
      const raw = this.text.slice(m.keyStart, m.keyEnd);
      if (m.keyEscaped ? JSON.parse(`"${raw}"`) === key : raw === key) return m;
    }
    return undefined;
  }
}

/** The top-level members of a JSON object's text (`{ keyStart, keyEnd, keyEscaped,
 * valueStart, valueEnd }`, offsets in UTF-16 units, key without its quotes), or `null`
 * if the text is not an object. Values are skipped, not checked. */
export function scanObject(s) {
  let i = skipWs(s, 0);
  if (s.charCodeAt(i) !== 0x7b) return null;
  i = skipWs(s, i + 1);
  const members = [];
  if (s.charCodeAt(i) === 0x7d) {
    i++;
  } else {
    for (;;) {
      if (s.charCodeAt(i) !== 0x22) return null;
      const key = skipString(s, i);
      if (key === null) return null;
      const keyStart = i + 1;
      i = skipWs(s, key.end);
      if (s.charCodeAt(i) !== 0x3a) return null;
      const valueStart = skipWs(s, i + 1);
      const valueEnd = skipValue(s, valueStart);
      if (valueEnd === null) return null;
      members.push({ keyStart, keyEnd: key.end - 1, keyEscaped: key.escaped, valueStart, valueEnd });
      i = skipWs(s, valueEnd);
      const c = s.charCodeAt(i);
      if (c === 0x2c) {
        i = skipWs(s, i + 1);
      } else if (c === 0x7d) {
        i++;
        break;
      } else {
        return null;
      }
    }
  }
  return skipWs(s, i) === s.length ? members : null;
}

function skipWs(s, i) {
  while (WS.has(s.charCodeAt(i))) i++;
  return i;
}

// From the opening quote at `i`: the index after the closing quote, and whether the
// string has escapes; `null` if it does not end.
function skipString(s, i) {
  let escaped = false;
  for (i++; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x22) return { end: i + 1, escaped };
    if (c === 0x5c) {
      escaped = true;
      i++;
    }
  }
  return null;
}

// From the first character of a value at `i`: the index after it, or `null`.
function skipValue(s, i) {
  const c = s.charCodeAt(i);
  if (c === 0x22) return skipString(s, i)?.end ?? null;
  if (c === 0x7b || c === 0x5b) {
    let depth = 0;
    while (i < s.length) {
      const d = s.charCodeAt(i);
      if (d === 0x22) {
        const str = skipString(s, i);
        if (str === null) return null;
        i = str.end;
        continue;
      }
      if (d === 0x7b || d === 0x5b) depth++;
      else if (d === 0x7d || d === 0x5d) {
        depth--;
        if (depth === 0) return i + 1;
      }
      i++;
    }
    return null;
  }
  const start = i;
  while (i < s.length && !VALUE_END.has(s.charCodeAt(i))) i++;
  return i > start ? i : null;
}
