// `enrich`, in C: the same plugin as plugins/enrich/src/lib.rs, with the same outcomes,
// reasons and output bytes. Pure functions, testable natively (test/test_enrich.c);
// plugin.c wires them to weir through the bindings wit-bindgen generates.
//
// For engagement events it
// - drops test traffic (an event whose `properties.<drop_flag>` is `true`);
// - rejects events that need a user (`require_user`) but have no `user_id`;
// - rejects a `profile_viewed` without a string `properties.profile_id`, and marks
//   the others with `self_view` (did the user look at their own profile?);
// - stamps every kept event with `properties.enriched_by = "enrich"`.
//
// Configuration (JSON, from the pipeline), every key optional:
// `{"require_user": ["profile_viewed", "post_liked"], "drop_flag": "is_test"}`.
#ifndef WEIR_EXAMPLE_ENRICH_H
#define WEIR_EXAMPLE_ENRICH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
  // Event names that must carry a `user_id` (NUL-terminated, malloc'd).
  char **require_user;
  size_t require_user_len;
  // A boolean property marking test traffic to drop (NUL-terminated, malloc'd).
  char *drop_flag;
  size_t drop_flag_len;
} enrich_config;

// Reads the configuration JSON (`len` bytes of `text`). Returns NULL and fills
// `config`, or returns the reason (malloc'd, starting `invalid plugin config: `) that
// every event is rejected with. Unknown and repeated keys are errors, as in the Rust
// plugin; unlike serde, the array form of the configuration is not accepted.
char *enrich_load_config(const char *text, size_t len, enrich_config *config);
void enrich_config_free(enrich_config *config);

// The parts of an event the plugin reads (borrowed, not NUL-terminated).
typedef struct {
  const char *name;
  size_t name_len;
  const char *user_id;  // NULL when the event has no user
  size_t user_id_len;
  const char *properties;
  size_t properties_len;
} enrich_event;

typedef enum { ENRICH_KEEP, ENRICH_DROP, ENRICH_REJECT } enrich_kind;

typedef struct {
  enrich_kind kind;
  // ENRICH_KEEP: the event's new properties (malloc'd, NUL-terminated).
  char *properties;
  size_t properties_len;
  // ENRICH_DROP, ENRICH_REJECT: the reason (malloc'd, NUL-terminated).
  char *reason;
} enrich_result;

// The host's counter import.
typedef void (*enrich_counter_add)(const char *name, uint64_t delta);

// Decides one event. Returns false only when out of memory.
bool enrich(const enrich_event *event, const enrich_config *config, enrich_counter_add counter_add,
            enrich_result *out);

#endif
