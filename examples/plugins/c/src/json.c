#include "json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

size_t json_skip_ws(const char *s, size_t n, size_t i) {
  while (i < n && is_ws(s[i])) i++;
  return i;
}

// From the opening quote at s[i]: the index after the closing quote (0 if none), and
// whether the string has escapes.
static size_t skip_string(const char *s, size_t n, size_t i, bool *escaped) {
  bool esc = false;
  for (i++; i < n; i++) {
    if (s[i] == '"') {
      if (escaped) *escaped = esc;
      return i + 1;
    }
    if (s[i] == '\\') {
      esc = true;
      i++;
    }
  }
  return 0;
}

size_t json_skip_value(const char *s, size_t n, size_t i) {
  if (i >= n) return 0;
  if (s[i] == '"') return skip_string(s, n, i, NULL);
  if (s[i] == '{' || s[i] == '[') {
    size_t depth = 0;
    while (i < n) {
      char c = s[i];
      if (c == '"') {
        i = skip_string(s, n, i, NULL);
        if (i == 0) return 0;
        continue;
      }
      if (c == '{' || c == '[') {
        depth++;
      } else if (c == '}' || c == ']') {
        if (--depth == 0) return i + 1;
      }
      i++;
    }
    return 0;
  }
  size_t start = i;
  while (i < n && !strchr(",}] \t\n\r", s[i])) i++;
  return i > start ? i : 0;
}

bool json_scan_object(const char *s, size_t n, json_member **members, size_t *count) {
  size_t cap = 8, len = 0;
  json_member *out = malloc(cap * sizeof *out);
  if (!out) return false;
  size_t i = json_skip_ws(s, n, 0);
  if (i >= n || s[i] != '{') goto fail;
  i = json_skip_ws(s, n, i + 1);
  if (i < n && s[i] == '}') {
    i++;
  } else {
    for (;;) {
      if (i >= n || s[i] != '"') goto fail;
      json_member m;
      size_t key_end = skip_string(s, n, i, &m.key_escaped);
      if (key_end == 0) goto fail;
      m.key_start = i + 1;
      m.key_end = key_end - 1;
      i = json_skip_ws(s, n, key_end);
      if (i >= n || s[i] != ':') goto fail;
      m.value_start = json_skip_ws(s, n, i + 1);
      m.value_end = json_skip_value(s, n, m.value_start);
      if (m.value_end == 0) goto fail;
      if (len == cap) {
        json_member *grown = realloc(out, (cap *= 2) * sizeof *out);
        if (!grown) goto fail;
        out = grown;
      }
      out[len++] = m;
      i = json_skip_ws(s, n, m.value_end);
      if (i < n && s[i] == ',') {
        i = json_skip_ws(s, n, i + 1);
      } else if (i < n && s[i] == '}') {
        i++;
        break;
      } else {
        goto fail;
      }
    }
  }
  if (json_skip_ws(s, n, i) != n) goto fail;
  *members = out;
  *count = len;
  return true;
fail:
  free(out);
  return false;
}

static int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static long hex4(const char *s, size_t n, size_t i) {
  if (i + 4 > n) return -1;
  long v = 0;
  for (size_t k = 0; k < 4; k++) {
    int d = hex_digit(s[i + k]);
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

static size_t put_utf8(char *out, uint32_t cp) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (cp >> 18));
  out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

char *json_decode_string(const char *s, size_t n, size_t *out_len) {
  if (n < 2 || s[0] != '"' || s[n - 1] != '"') return NULL;
  // Decoding never makes a string longer than its escaped text.
  char *out = malloc(n);
  if (!out) return NULL;
  size_t o = 0;
  for (size_t i = 1; i < n - 1; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x20 || c == '"') goto fail;
    if (c != '\\') {
      out[o++] = (char)c;
      continue;
    }
    if (++i >= n - 1) goto fail;
    switch (s[i]) {
      case '"': out[o++] = '"'; break;
      case '\\': out[o++] = '\\'; break;
      case '/': out[o++] = '/'; break;
      case 'b': out[o++] = '\b'; break;
      case 'f': out[o++] = '\f'; break;
      case 'n': out[o++] = '\n'; break;
      case 'r': out[o++] = '\r'; break;
      case 't': out[o++] = '\t'; break;
      case 'u': {
        long cp = hex4(s, n - 1, i + 1);
        if (cp < 0 || (cp >= 0xDC00 && cp <= 0xDFFF)) goto fail;
        i += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          // A leading surrogate must be followed by a trailing one.
          if (i + 2 >= n - 1 || s[i + 1] != '\\' || s[i + 2] != 'u') goto fail;
          long low = hex4(s, n - 1, i + 3);
          if (low < 0xDC00 || low > 0xDFFF) goto fail;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          i += 6;
        }
        o += put_utf8(out + o, (uint32_t)cp);
        break;
      }
      default: goto fail;
    }
  }
  out[o] = '\0';
  *out_len = o;
  return out;
fail:
  free(out);
  return NULL;
}

bool json_object_init(json_object *o, const char *text, size_t len) {
  memset(o, 0, sizeof *o);
  o->text = malloc(len + 1);
  if (!o->text) return false;
  memcpy(o->text, text, len);
  o->text[len] = '\0';
  o->len = len;
  if (!json_scan_object(o->text, o->len, &o->members, &o->count)) {
    o->members = NULL;
    o->count = 0;
  }
  return true;
}

void json_object_free(json_object *o) {
  free(o->text);
  free(o->members);
  memset(o, 0, sizeof *o);
}

static bool key_matches(const json_object *o, const json_member *m, const char *key, size_t key_len) {
  if (!m->key_escaped) {
    return m->key_end - m->key_start == key_len && memcmp(o->text + m->key_start, key, key_len) == 0;
  }
  size_t len;
  char *decoded = json_decode_string(o->text + m->key_start - 1, m->key_end - m->key_start + 2, &len);
  bool same = decoded && len == key_len && memcmp(decoded, key, key_len) == 0;
  free(decoded);
  return same;
}

static const json_member *find(const json_object *o, const char *key, size_t key_len) {
  for (size_t i = o->count; i > 0; i--) {
    if (key_matches(o, &o->members[i - 1], key, key_len)) return &o->members[i - 1];
  }
  return NULL;
}

const char *json_object_get(const json_object *o, const char *key, size_t key_len, size_t *value_len) {
  const json_member *m = find(o, key, key_len);
  if (!m) return NULL;
  *value_len = m->value_end - m->value_start;
  return o->text + m->value_start;
}

// Writes `key` as a JSON string literal (escaping as serde_json does) into out, which
// has room for 6 * key_len + 2 bytes; returns the length written.
static size_t write_key(char *out, const char *key, size_t key_len) {
  static const char hex[] = "0123456789abcdef";
  size_t o = 0;
  out[o++] = '"';
  for (size_t i = 0; i < key_len; i++) {
    unsigned char c = (unsigned char)key[i];
    const char *short_escape = NULL;
    switch (c) {
      case '"': short_escape = "\\\""; break;
      case '\\': short_escape = "\\\\"; break;
      case '\b': short_escape = "\\b"; break;
      case '\f': short_escape = "\\f"; break;
      case '\n': short_escape = "\\n"; break;
      case '\r': short_escape = "\\r"; break;
      case '\t': short_escape = "\\t"; break;
    }
    if (short_escape) {
      out[o++] = short_escape[0];
      out[o++] = short_escape[1];
    } else if (c < 0x20) {
      memcpy(out + o, "\\u00", 4);
      out[o + 4] = hex[c >> 4];
      out[o + 5] = hex[c & 0xF];
      o += 6;
    } else {
      out[o++] = (char)c;
    }
  }
  out[o++] = '"';
  return o;
}

bool json_object_set(json_object *o, const char *key, size_t key_len, const char *value_json) {
  size_t value_len = strlen(value_json);
  const char *base = o->members ? o->text : "{}";
  size_t base_len = o->members ? o->len : 2;
  const json_member *m = o->members ? find(o, key, key_len) : NULL;
  // The new text: base[0..cut_start] + insert + base[cut_end..].
  size_t cut_start, cut_end, insert_len;
  char *insert = malloc(6 * key_len + value_len + 4);
  if (!insert) return false;
  if (m) {
    cut_start = m->value_start;
    cut_end = m->value_end;
    memcpy(insert, value_json, value_len);
    insert_len = value_len;
  } else {
    if (o->count > 0) {
      cut_start = o->members[o->count - 1].value_end;
    } else {
      size_t end = base_len;
      while (end > 0 && is_ws(base[end - 1])) end--;
      cut_start = end - 1;  // the closing `}`
    }
    cut_end = cut_start;
    insert_len = 0;
    if (o->count > 0) insert[insert_len++] = ',';
    insert_len += write_key(insert + insert_len, key, key_len);
    insert[insert_len++] = ':';
    memcpy(insert + insert_len, value_json, value_len);
    insert_len += value_len;
  }
  size_t len = base_len - (cut_end - cut_start) + insert_len;
  char *text = malloc(len + 1);
  if (!text) {
    free(insert);
    return false;
  }
  memcpy(text, base, cut_start);
  memcpy(text + cut_start, insert, insert_len);
  memcpy(text + cut_start + insert_len, base + cut_end, base_len - cut_end);
  text[len] = '\0';
  free(insert);
  json_member *members;
  size_t count;
  if (!json_scan_object(text, len, &members, &count)) {
    // Only when out of memory, or if value_json was not one JSON value.
    free(text);
    return false;
  }
  free(o->text);
  free(o->members);
  o->text = text;
  o->len = len;
  o->members = members;
  o->count = count;
  return true;
}

// --- Validation (the configuration) ---------------------------------------------------

typedef struct {
  const char *s;
  size_t n, i;
  int depth;
  const char *error;
} validator;

static bool fail(validator *v, const char *error) {
  if (!v->error) v->error = error;
  return false;
}

static bool valid_value(validator *v);

static bool valid_string(validator *v) {
  bool escaped;
  size_t end = skip_string(v->s, v->n, v->i, &escaped);
  if (end == 0) return fail(v, "EOF while parsing a string");
  size_t len;
  char *decoded = json_decode_string(v->s + v->i, end - v->i, &len);
  if (!decoded) return fail(v, "invalid string (bad escape or control character)");
  free(decoded);
  v->i = end;
  return true;
}

static bool valid_number(validator *v) {
  const char *s = v->s;
  size_t i = v->i, n = v->n;
  if (i < n && s[i] == '-') i++;
  if (i >= n || s[i] < '0' || s[i] > '9') return fail(v, "invalid number");
  if (s[i] == '0') {
    i++;
  } else {
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
  }
  if (i < n && s[i] == '.') {
    size_t start = ++i;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i == start) return fail(v, "invalid number");
  }
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    i++;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    size_t start = i;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i == start) return fail(v, "invalid number");
  }
  v->i = i;
  return true;
}

static bool valid_nested(validator *v, char close, bool object) {
  if (++v->depth >= 128) return fail(v, "recursion limit exceeded");
  v->i = json_skip_ws(v->s, v->n, v->i + 1);
  if (v->i < v->n && v->s[v->i] == close) {
    v->i++;
    v->depth--;
    return true;
  }
  for (;;) {
    if (object) {
      if (v->i >= v->n || v->s[v->i] != '"') return fail(v, "key must be a string");
      if (!valid_string(v)) return false;
      v->i = json_skip_ws(v->s, v->n, v->i);
      if (v->i >= v->n || v->s[v->i] != ':') return fail(v, "expected `:`");
      v->i++;
    }
    if (!valid_value(v)) return false;
    v->i = json_skip_ws(v->s, v->n, v->i);
    if (v->i < v->n && v->s[v->i] == ',') {
      v->i++;
      v->i = json_skip_ws(v->s, v->n, v->i);
      continue;
    }
    if (v->i < v->n && v->s[v->i] == close) {
      v->i++;
      v->depth--;
      return true;
    }
    return fail(v, object ? "expected `,` or `}`" : "expected `,` or `]`");
  }
}

static bool valid_literal(validator *v, const char *word) {
  size_t len = strlen(word);
  if (v->n - v->i < len || memcmp(v->s + v->i, word, len) != 0) return fail(v, "expected value");
  v->i += len;
  return true;
}

static bool valid_value(validator *v) {
  v->i = json_skip_ws(v->s, v->n, v->i);
  if (v->i >= v->n) return fail(v, "EOF while parsing a value");
  switch (v->s[v->i]) {
    case '{': return valid_nested(v, '}', true);
    case '[': return valid_nested(v, ']', false);
    case '"': return valid_string(v);
    case 't': return valid_literal(v, "true");
    case 'f': return valid_literal(v, "false");
    case 'n': return valid_literal(v, "null");
    default: return valid_number(v);
  }
}

bool json_valid(const char *text, size_t len, const char **error) {
  validator v = {text, len, 0, 0, NULL};
  if (valid_value(&v) && json_skip_ws(text, len, v.i) != len) fail(&v, "trailing characters");
  if (v.error && error) *error = v.error;
  return v.error == NULL;
}
