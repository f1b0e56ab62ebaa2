#include "enrich.h"

#include <stdlib.h>
#include <string.h>

#include "json.h"

static char *copy(const char *s, size_t len) {
  char *out = malloc(len + 1);
  if (!out) return NULL;
  memcpy(out, s, len);
  out[len] = '\0';
  return out;
}

// a + b + c, malloc'd (NULL if out of memory). Built by hand: stdio (snprintf) would
// pull WASI imports into the component.
static char *concat(const char *a, const char *b, size_t b_len, const char *c) {
  size_t a_len = strlen(a), c_len = strlen(c);
  char *out = malloc(a_len + b_len + c_len + 1);
  if (!out) return NULL;
  memcpy(out, a, a_len);
  memcpy(out + a_len, b, b_len);
  memcpy(out + a_len + b_len, c, c_len + 1);
  return out;
}

// A reason: "invalid plugin config: " + before + arg + after (malloc'd).
static char *config_error(const char *before, const char *arg, const char *after) {
  char *tail = concat(before, arg, strlen(arg), after);
  char *out = tail ? concat("invalid plugin config: ", tail, strlen(tail), "") : NULL;
  free(tail);
  return out;
}

static bool add_name(enrich_config *c, char *name) {
  char **grown = realloc(c->require_user, (c->require_user_len + 1) * sizeof *grown);
  if (!grown) return false;
  c->require_user = grown;
  c->require_user[c->require_user_len++] = name;
  return true;
}

static const char *kind_of(char c) {
  switch (c) {
    case '{': return "map";
    case '[': return "sequence";
    case '"': return "string";
    case 't': case 'f': return "boolean";
    case 'n': return "null";
    default: return "number";
  }
}

// The array of strings at text[start..end) into config->require_user.
static char *read_names(const char *text, size_t start, size_t end, enrich_config *config) {
  if (text[start] != '[') return config_error("invalid type: ", kind_of(text[start]), ", expected a sequence");
  size_t i = json_skip_ws(text, end, start + 1);
  if (text[i] == ']') return NULL;
  for (;;) {
    size_t item_end = json_skip_value(text, end, i);
    if (text[i] != '"') return config_error("invalid type: ", kind_of(text[i]), ", expected a string");
    size_t len;
    char *name = json_decode_string(text + i, item_end - i, &len);
    if (!name || !add_name(config, name)) {
      free(name);
      return config_error("", "out of memory", "");
    }
    i = json_skip_ws(text, end, item_end);
    if (text[i] == ']') return NULL;
    i = json_skip_ws(text, end, i + 1);  // the `,` (the text is valid JSON)
  }
}

void enrich_config_free(enrich_config *config) {
  for (size_t i = 0; i < config->require_user_len; i++) free(config->require_user[i]);
  free(config->require_user);
  free(config->drop_flag);
  memset(config, 0, sizeof *config);
}

static char *set_defaults(enrich_config *config, bool names, bool flag) {
  if (names) {
    const char *defaults[] = {"profile_viewed", "post_liked"};
    for (size_t i = 0; i < 2; i++) {
      char *name = copy(defaults[i], strlen(defaults[i]));
      if (!name || !add_name(config, name)) {
        free(name);
        return config_error("", "out of memory", "");
      }
    }
  }
  if (flag) {
    config->drop_flag = copy("is_test", 7);
    config->drop_flag_len = 7;
    if (!config->drop_flag) return config_error("", "out of memory", "");
  }
  return NULL;
}

char *enrich_load_config(const char *text, size_t len, enrich_config *config) {
  memset(config, 0, sizeof *config);
  const char *error;
  if (!json_valid(text, len, &error)) return config_error("", error, "");
  json_member *members;
  size_t count;
  if (!json_scan_object(text, len, &members, &count)) {
    return config_error("invalid type: ", kind_of(text[json_skip_ws(text, len, 0)]), ", expected struct Config");
  }
  bool seen_names = false, seen_flag = false;
  char *reason = NULL;
  for (size_t m = 0; m < count && !reason; m++) {
    json_member *member = &members[m];
    size_t key_len;
    char *key = json_decode_string(text + member->key_start - 1, member->key_end - member->key_start + 2, &key_len);
    if (!key) {
      reason = config_error("", "out of memory", "");
      break;
    }
    const char *value = text + member->value_start;
    if (strcmp(key, "require_user") == 0 || strcmp(key, "drop_flag") == 0) {
      bool names = key[0] == 'r';
      if (names ? seen_names : seen_flag) {
        reason = config_error("duplicate field `", key, "`");
      } else if (names) {
        seen_names = true;
        reason = read_names(text, member->value_start, member->value_end, config);
      } else {
        seen_flag = true;
        size_t flag_len = 0;
        config->drop_flag = value[0] == '"' ? json_decode_string(value, member->value_end - member->value_start, &flag_len) : NULL;
        config->drop_flag_len = flag_len;
        if (!config->drop_flag) reason = config_error("invalid type: ", kind_of(value[0]), ", expected a string");
      }
    } else {
      reason = config_error("unknown field `", key, "`, expected `require_user` or `drop_flag`");
    }
    free(key);
  }
  free(members);
  if (!reason) reason = set_defaults(config, !seen_names, !seen_flag);
  if (reason) enrich_config_free(config);
  return reason;
}

static bool reason(enrich_result *out, enrich_kind kind, const char *text) {
  out->kind = kind;
  out->reason = copy(text, strlen(text));
  return out->reason != NULL;
}

static bool needs_user(const enrich_event *e, const enrich_config *c) {
  for (size_t i = 0; i < c->require_user_len; i++) {
    if (strlen(c->require_user[i]) == e->name_len && memcmp(c->require_user[i], e->name, e->name_len) == 0) return true;
  }
  return false;
}

static bool is(const char *text, size_t len, const char *word) {
  return len == strlen(word) && memcmp(text, word, len) == 0;
}

bool enrich(const enrich_event *event, const enrich_config *config, enrich_counter_add counter_add,
            enrich_result *out) {
  memset(out, 0, sizeof *out);
  json_object properties;
  if (!json_object_init(&properties, event->properties, event->properties_len)) return false;
  bool ok = true;
  size_t len;
  const char *value = json_object_get(&properties, config->drop_flag, config->drop_flag_len, &len);
  if (value && is(value, len, "true")) {
    counter_add("dropped_test_traffic", 1);
    ok = reason(out, ENRICH_DROP, "test traffic");
    goto done;
  }
  if (!event->user_id && needs_user(event, config)) {
    out->kind = ENRICH_REJECT;
    out->reason = concat("", event->name, event->name_len, " requires a user_id");
    ok = out->reason != NULL;
    goto done;
  }
  if (is(event->name, event->name_len, "profile_viewed")) {
    value = json_object_get(&properties, "profile_id", 10, &len);
    char *profile = value && value[0] == '"' ? json_decode_string(value, len, &len) : NULL;
    if (!profile) {
      ok = reason(out, ENRICH_REJECT, "profile_viewed needs a string properties.profile_id");
      goto done;
    }
    bool self_view = event->user_id && event->user_id_len == len && memcmp(event->user_id, profile, len) == 0;
    free(profile);
    ok = json_object_set(&properties, "self_view", 9, self_view ? "true" : "false");
  }
  ok = ok && json_object_set(&properties, "enriched_by", 11, "\"enrich\"");
  if (ok) {
    out->kind = ENRICH_KEEP;
    out->properties = properties.text;
    out->properties_len = properties.len;
    properties.text = NULL;  // moved to out
  }
done:
  json_object_free(&properties);
  return ok;
}
