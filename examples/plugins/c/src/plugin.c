// The component's entry point: the `plugin` world of wit/plugin.wit
// (weir:plugin@0.1.0), through the bindings `wit-bindgen c` generates (plugin.h,
// plugin.c, plugin_component_type.o; see build.sh). The logic is in enrich.c.
//
// Ownership, as wit-bindgen's C bindings define it: `process` owns the events it is
// given (it frees them, or moves their strings into its outcomes) and returns outcomes
// whose strings are malloc'd; the generated post-return function frees those after the
// host has copied them out.
#include <stdlib.h>
#include <string.h>

#include "enrich.h"
#include "plugin.h"

// Read once per instance, at the first batch: constant for the instance's life.
static bool loaded;
static enrich_config config;
static char *config_error;  // when set, every event is rejected with it

static void counter_add(const char *name, uint64_t delta) {
  plugin_string_t s = {(uint8_t *)name, strlen(name)};
  weir_plugin_host_counter_add(&s, delta);
}

static void load_config(void) {
  plugin_string_t text;
  weir_plugin_host_config(&text);
  config_error = enrich_load_config((const char *)text.ptr, text.len, &config);
  plugin_string_free(&text);
  loaded = true;
}

static plugin_string_t owned(char *s) { return (plugin_string_t){(uint8_t *)s, strlen(s)}; }

static char *dup(const char *s) {
  size_t len = strlen(s);
  char *out = malloc(len + 1);
  if (!out) abort();
  return memcpy(out, s, len + 1);
}

void exports_plugin_process(plugin_list_event_t *events, plugin_list_outcome_t *ret) {
  if (!loaded) load_config();
  ret->len = events->len;
  ret->ptr = calloc(events->len ? events->len : 1, sizeof *ret->ptr);
  // Out of memory: trap. The host dead-letters the batch's events one by one, naming
  // the memory cap, and carries on with a fresh instance.
  if (!ret->ptr) abort();
  for (size_t i = 0; i < events->len; i++) {
    plugin_event_t *e = &events->ptr[i];
    plugin_outcome_t *out = &ret->ptr[i];
    if (config_error) {
      out->tag = WEIR_PLUGIN_TYPES_OUTCOME_REJECT;
      out->val.reject = owned(dup(config_error));
      weir_plugin_types_event_free(e);
      continue;
    }
    enrich_event view = {
        .name = (const char *)e->name.ptr,
        .name_len = e->name.len,
        .user_id = e->user_id.is_some ? (e->user_id.val.ptr ? (const char *)e->user_id.val.ptr : "") : NULL,
        .user_id_len = e->user_id.is_some ? e->user_id.val.len : 0,
        .properties = (const char *)e->properties.ptr,
        .properties_len = e->properties.len,
    };
    enrich_result r;
    if (!enrich(&view, &config, counter_add, &r)) abort();
    switch (r.kind) {
      case ENRICH_KEEP:
        // The event goes back with its strings moved, its properties replaced.
        out->tag = WEIR_PLUGIN_TYPES_OUTCOME_KEEP;
        plugin_string_free(&e->properties);
        out->val.keep = *e;
        out->val.keep.properties = (plugin_string_t){(uint8_t *)r.properties, r.properties_len};
        break;
      case ENRICH_DROP:
        out->tag = WEIR_PLUGIN_TYPES_OUTCOME_DROP;
        out->val.drop = owned(r.reason);
        weir_plugin_types_event_free(e);
        break;
      case ENRICH_REJECT:
        out->tag = WEIR_PLUGIN_TYPES_OUTCOME_REJECT;
        out->val.reject = owned(r.reason);
        weir_plugin_types_event_free(e);
        break;
    }
  }
  free(events->ptr);
}
