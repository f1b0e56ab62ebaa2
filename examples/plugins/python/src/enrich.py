"""``enrich``, in Python: the same plugin as plugins/enrich/src/lib.rs, with the same
outcomes, reasons and output bytes (properties are edited in place, as the Rust SDK
does: see json_object.py). Pure functions: app.py wires them to weir.

For engagement events it

- drops test traffic (an event whose ``properties.<drop_flag>`` is ``true``);
- rejects events that need a user (``require_user``) but have no ``user_id``;
- rejects a ``profile_viewed`` without a string ``properties.profile_id``, and marks
  the others with ``self_view`` (did the user look at their own profile?);
- stamps every kept event with ``properties.enriched_by = "enrich"``.

Configuration (JSON, from the pipeline), every key optional:
``{"require_user": ["profile_viewed", "post_liked"], "drop_flag": "is_test"}``.
"""

import json
from dataclasses import dataclass

from json_object import JsonObject
from serde_json_compat import JsonError, Pairs, format_f64, loads


@dataclass(frozen=True)
class Config:
    # Event names that must carry a `user_id`.
    require_user: tuple = ("profile_viewed", "post_liked")
    # A boolean property marking test traffic to drop.
    drop_flag: str = "is_test"


FIELDS = ("require_user", "drop_flag")


class ConfigError(ValueError):
    pass


def load_config(text):
    """Reads the plugin's configuration JSON with the Rust plugin's rules (every key
    optional, no unknown or repeated keys). Returns a ``Config``, or the reason (a
    ``str``) every event is rejected with when the configuration is invalid."""
    try:
        return _read_config(text)
    except (JsonError, ConfigError) as e:
        return f"invalid plugin config: {e}"


def _read_config(text):
    value, _ = loads(text, pairs=True)
    fields = {}
    if isinstance(value, Pairs):
        for key, item in value:
            if key not in FIELDS:
                raise ConfigError(f"unknown field `{key}`, expected `require_user` or `drop_flag`")
            if key in fields:
                raise ConfigError(f"duplicate field `{key}`")
            fields[key] = item
    elif isinstance(value, list):
        # serde also accepts a struct as an array of its fields, in order.
        if len(value) > len(FIELDS):
            raise ConfigError("trailing characters")
        fields = dict(zip(FIELDS, value))
    else:
        raise ConfigError(f"invalid type: {_describe(value)}, expected struct Config")
    config = Config()
    if "require_user" in fields:
        names = fields["require_user"]
        if not isinstance(names, list) or isinstance(names, Pairs):
            raise ConfigError(f"invalid type: {_describe(names)}, expected a sequence")
        config = Config(tuple(_string(n) for n in names), config.drop_flag)
    if "drop_flag" in fields:
        config = Config(config.require_user, _string(fields["drop_flag"]))
    return config


def _string(value):
    if not isinstance(value, str):
        raise ConfigError(f"invalid type: {_describe(value)}, expected a string")
    return value


def _describe(value):
    """As serde describes an unexpected value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, Pairs):
        return "map"
    if isinstance(value, list):
        return "sequence"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, float):
        return f"floating point `{format_f64(value)}`"
    return f"integer `{value}`"


def enrich(event, config, counter_add):
    """Decides one event. ``event`` is the WIT record (fields ``name``, ``user_id``,
    ``properties`` ...); ``counter_add(name, delta)`` is the host's counter import.
    Returns ``("keep", event)`` with the event's properties updated, ``("drop", reason)``
    or ``("reject", reason)``."""
    properties = JsonObject(event.properties)
    if properties.get(config.drop_flag) is True:
        counter_add("dropped_test_traffic", 1)
        return ("drop", "test traffic")
    if event.user_id is None and event.name in config.require_user:
        return ("reject", f"{event.name} requires a user_id")
    if event.name == "profile_viewed":
        profile = properties.get("profile_id")
        if not isinstance(profile, str):
            return ("reject", "profile_viewed needs a string properties.profile_id")
        properties.set("self_view", event.user_id == profile)
    properties.set("enriched_by", "enrich")
    event.properties = properties.text
    return ("keep", event)
