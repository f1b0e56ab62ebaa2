// Unit tests of the plugin's logic, run natively (no WebAssembly needed):
//   ./build.sh --test
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/enrich.h"
#include "../src/json.h"

static int failures;
static unsigned dropped_counted;

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                     \
    }                                                                 \
  } while (0)

#define CHECK_STR(got, want)                                                                   \
  do {                                                                                         \
    const char *g_ = (got), *w_ = (want);                                                      \
    if (!g_ || strcmp(g_, w_) != 0) {                                                          \
      fprintf(stderr, "%s:%d: got %s\n  want %s\n", __FILE__, __LINE__, g_ ? g_ : "(null)", w_); \
      failures++;                                                                              \
    }                                                                                          \
  } while (0)

static void counter_add(const char *name, uint64_t delta) {
  if (strcmp(name, "dropped_test_traffic") == 0) dropped_counted += (unsigned)delta;
}

static enrich_config default_config(void) {
  enrich_config config;
  char *error = enrich_load_config("{}", 2, &config);
  if (error) {
    fprintf(stderr, "default config: %s\n", error);
    exit(1);
  }
  return config;
}

// Runs one event; returns "keep <properties>", "drop <reason>" or "reject <reason>"
// (malloc'd).
static char *run(const char *name, const char *user, const char *properties, const enrich_config *config) {
  enrich_event e = {name, strlen(name), user, user ? strlen(user) : 0, properties, strlen(properties)};
  enrich_result r;
  if (!enrich(&e, config, counter_add, &r)) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  const char *kind = r.kind == ENRICH_KEEP ? "keep " : r.kind == ENRICH_DROP ? "drop " : "reject ";
  const char *text = r.kind == ENRICH_KEEP ? r.properties : r.reason;
  char *out = malloc(strlen(kind) + strlen(text) + 1);
  strcpy(out, kind);
  strcat(out, text);
  free(r.properties);
  free(r.reason);
  return out;
}

#define CHECK_RUN(name, user, properties, config, want) \
  do {                                                   \
    char *got_ = run(name, user, properties, config);    \
    CHECK_STR(got_, want);                               \
    free(got_);                                          \
  } while (0)

static void test_outcomes(void) {
  enrich_config c = default_config();
  CHECK_RUN("app_opened", NULL, "{\"b\":2,\"a\":1}", &c, "keep {\"b\":2,\"a\":1,\"enriched_by\":\"enrich\"}");
  CHECK_RUN("profile_viewed", NULL, "{}", &c, "reject profile_viewed requires a user_id");
  CHECK_RUN("post_liked", NULL, "{}", &c, "reject post_liked requires a user_id");
  CHECK_RUN("profile_viewed", "u1", "{\"profile_id\":7}", &c,
            "reject profile_viewed needs a string properties.profile_id");
  CHECK_RUN("profile_viewed", "u1", "{\"profile_id\":\"u1\"}", &c,
            "keep {\"profile_id\":\"u1\",\"self_view\":true,\"enriched_by\":\"enrich\"}");
  CHECK_RUN("profile_viewed", "u1", "{\"profile_id\":\"\\u0075\\u0032\",\"self_view\":1}", &c,
            "keep {\"profile_id\":\"\\u0075\\u0032\",\"self_view\":false,\"enriched_by\":\"enrich\"}");
  dropped_counted = 0;
  CHECK_RUN("app_opened", NULL, "{\"is_test\": true}", &c, "drop test traffic");
  CHECK(dropped_counted == 1);
  CHECK_RUN("app_opened", NULL, "{\"is_test\":\"true\"}", &c,
            "keep {\"is_test\":\"true\",\"enriched_by\":\"enrich\"}");
  const char *not_objects[] = {"", "[]", "null", "{\"a\":1,}", "{\"a\" 1}", "{\"a\":1", "{} x"};
  for (size_t i = 0; i < sizeof not_objects / sizeof *not_objects; i++) {
    CHECK_RUN("app_opened", NULL, not_objects[i], &c, "keep {\"enriched_by\":\"enrich\"}");
  }
  enrich_config_free(&c);
}

static void test_configuration(void) {
  enrich_config c;
  char *error = enrich_load_config("{\"require_user\":[\"app_opened\"],\"drop_flag\":\"qa\"}", 48, &c);
  CHECK(error == NULL);
  CHECK(c.require_user_len == 1 && strcmp(c.require_user[0], "app_opened") == 0);
  CHECK_STR(c.drop_flag, "qa");
  CHECK_RUN("app_opened", NULL, "{}", &c, "reject app_opened requires a user_id");
  CHECK_RUN("x", NULL, "{\"qa\":true}", &c, "drop test traffic");
  enrich_config_free(&c);

  const char *bad[][2] = {
      {"", "invalid plugin config: EOF while parsing a value"},
      {"null", "invalid plugin config: invalid type: null, expected struct Config"},
      {"{\"drop_flag\":1}", "invalid plugin config: invalid type: number, expected a string"},
      {"{\"other\":1}", "invalid plugin config: unknown field `other`, expected `require_user` or `drop_flag`"},
      {"{\"drop_flag\":\"a\",\"drop_flag\":\"b\"}", "invalid plugin config: duplicate field `drop_flag`"},
      {"{\"require_user\":\"x\"}", "invalid plugin config: invalid type: string, expected a sequence"},
      {"{\"require_user\":[1]}", "invalid plugin config: invalid type: number, expected a string"},
      {"{\"a\":tru}", "invalid plugin config: expected value"},
      {"{\"a\":\"\\ud800\"}", "invalid plugin config: invalid string (bad escape or control character)"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    error = enrich_load_config(bad[i][0], strlen(bad[i][0]), &c);
    CHECK_STR(error, bad[i][1]);
    free(error);
  }
  char deep[300];
  memset(deep, '[', 128);
  memset(deep + 128, ']', 128);
  const char *why;
  CHECK(!json_valid(deep, 256, &why) && strcmp(why, "recursion limit exceeded") == 0);
  CHECK(json_valid(deep + 1, 254, &why));
}

// The same cases as sdk-guest/src/lib.rs's tests.
static void test_json_object(void) {
  json_object o;
  const char *raw =
      "{ \"n\": 18446744073709551616, \"f\": 1.0, \"s\": \"a}\\\"b\", \"o\": {\"x\": [1, \"]\"]}, \"t\": false }";
  CHECK(json_object_init(&o, raw, strlen(raw)));
  size_t len;
  const char *v = json_object_get(&o, "t", 1, &len);
  CHECK(v && len == 5 && memcmp(v, "false", 5) == 0);
  v = json_object_get(&o, "s", 1, &len);
  char *s = v ? json_decode_string(v, len, &len) : NULL;
  CHECK_STR(s, "a}\"b");
  free(s);
  CHECK(json_object_set(&o, "t", 1, "\"yes\""));
  CHECK(json_object_set(&o, "added", 5, "{\"k\":[true]}"));
  CHECK(json_object_set(&o, "f", 1, "2"));
  CHECK_STR(o.text,
            "{ \"n\": 18446744073709551616, \"f\": 2, \"s\": \"a}\\\"b\", \"o\": {\"x\": [1, \"]\"]}, \"t\": "
            "\"yes\",\"added\":{\"k\":[true]} }");
  json_object_free(&o);

  raw = "{\"a\":1,\"\\u0061\":2,\"b\\\"\":3}";
  CHECK(json_object_init(&o, raw, strlen(raw)));
  v = json_object_get(&o, "a", 1, &len);
  CHECK(v && len == 1 && v[0] == '2');
  v = json_object_get(&o, "b\"", 2, &len);
  CHECK(v && len == 1 && v[0] == '3');
  CHECK(json_object_set(&o, "a", 1, "9"));
  CHECK(json_object_set(&o, "q\"", 2, "1"));
  CHECK_STR(o.text, "{\"a\":1,\"\\u0061\":9,\"b\\\"\":3,\"q\\\"\":1}");
  json_object_free(&o);

  CHECK(json_object_init(&o, " { } ", 5));
  CHECK(json_object_set(&o, "k", 1, "1"));
  CHECK_STR(o.text, " { \"k\":1} ");
  json_object_free(&o);

  s = json_decode_string("\"\\ud83d\\ude00\\u00e9\\n\"", 22, &len);
  CHECK_STR(s, "\xF0\x9F\x98\x80\xC3\xA9\n");
  free(s);
  CHECK(json_decode_string("\"\\ud800\"", 8, &len) == NULL);
  CHECK(json_decode_string("\"\\x\"", 4, &len) == NULL);
}

int main(void) {
  test_outcomes();
  test_configuration();
  test_json_object();
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("test_enrich: all checks passed\n");
  return 0;
}
