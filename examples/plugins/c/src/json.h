// JSON for the C example plugin: an event's properties kept as text and edited in
// place, the way weir's Rust SDK does it (sdk-guest/src/lib.rs, `JsonObject`), plus
// the strict parsing the plugin's configuration needs. No allocation happens behind
// the caller's back: every function that allocates says so.
#ifndef WEIR_EXAMPLE_JSON_H
#define WEIR_EXAMPLE_JSON_H

#include <stdbool.h>
#include <stddef.h>

// One top-level member of an object's text: offsets into the text. The key is the
// text between its quotes (still escaped when `key_escaped`).
typedef struct {
  size_t key_start, key_end;
  bool key_escaped;
  size_t value_start, value_end;
} json_member;

// A JSON object kept as text (owned, NUL-terminated, malloc'd).
//
// - Reading a member scans the text's top level; only that member's value is decoded.
// - Setting a member splices its new value into the text: every other member keeps
//   its bytes (numbers, spacing, key order) and its place; a new member goes after the
//   last one.
// - A key that appears more than once is read and replaced at its last occurrence.
// - Text that is not a JSON object reads as `{}` and becomes one when a member is set.
typedef struct {
  char *text;
  size_t len;
  json_member *members;  // NULL when `text` is not an object
  size_t count;
} json_object;

// Takes a copy of `len` bytes of `text`. Returns false if out of memory.
bool json_object_init(json_object *o, const char *text, size_t len);
void json_object_free(json_object *o);

// The value text of the last member named `key` (`key_len` bytes), or NULL.
const char *json_object_get(const json_object *o, const char *key, size_t key_len, size_t *value_len);

// Sets member `key` to `value_json`, which must be the text of one JSON value. Returns
// false if out of memory (the object is then unchanged).
bool json_object_set(json_object *o, const char *key, size_t key_len, const char *value_json);

// The members of an object's text (malloc'd into *members, *count of them), or false
// if it is not an object (or out of memory). Values are skipped, not checked.
bool json_scan_object(const char *text, size_t len, json_member **members, size_t *count);

// Decodes the JSON string literal `text` (with its quotes, `len` bytes) into UTF-8:
// a malloc'd, NUL-terminated string, its length in *out_len. NULL if it is not a valid
// string literal (bad escape, lone surrogate, control character) or out of memory.
char *json_decode_string(const char *text, size_t len, size_t *out_len);

// Whether `text` is exactly one valid JSON value (whitespace around it allowed),
// nested at most 127 deep. On failure, a message in `error` (a static string).
bool json_valid(const char *text, size_t len, const char **error);

// The index after the value starting at text[i] (whitespace not skipped), or 0 if
// no value starts there. Values are skipped, not checked.
size_t json_skip_value(const char *text, size_t len, size_t i);

// The index of the first non-whitespace byte at or after i.
size_t json_skip_ws(const char *text, size_t len, size_t i);

#endif
