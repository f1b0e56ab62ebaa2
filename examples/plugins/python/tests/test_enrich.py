"""Unit tests of the plugin's logic, run natively (no build needed):
``python3 -m unittest discover -s tests -v`` in examples/plugins/python."""

import sys
import unittest
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from enrich import Config, enrich, load_config
from json_object import JsonObject
from serde_json_compat import loads


def event(name, user_id=None, properties="{}"):
    return SimpleNamespace(
        event_id="e1", app="demo", name=name, user_id=user_id, timestamp_ms=1700000000000,
        properties=properties, context='{"x":  1}',
    )


def run(e, config=Config()):
    counters = {}

    def counter_add(name, delta):
        counters[name] = counters.get(name, 0) + delta

    return enrich(e, config, counter_add), counters


class EnrichTest(unittest.TestCase):
    def test_stamps_kept_events_and_leaves_the_rest_alone(self):
        (kind, kept), _ = run(event("app_opened", properties='{"b":2,"a":1}'))
        self.assertEqual(kind, "keep")
        self.assertEqual(kept.properties, '{"b":2,"a":1,"enriched_by":"enrich"}')
        self.assertEqual(kept.context, '{"x":  1}')

    def test_profile_views_need_a_user_and_a_profile(self):
        self.assertEqual(run(event("profile_viewed"))[0], ("reject", "profile_viewed requires a user_id"))
        self.assertEqual(run(event("post_liked"))[0], ("reject", "post_liked requires a user_id"))
        no_profile = event("profile_viewed", "u1", '{"profile_id":7}')
        self.assertEqual(run(no_profile)[0], ("reject", "profile_viewed needs a string properties.profile_id"))
        own = event("profile_viewed", "u1", '{"profile_id":"u1"}')
        self.assertEqual(run(own)[0][1].properties, '{"profile_id":"u1","self_view":true,"enriched_by":"enrich"}')
        other = event("profile_viewed", "u1", '{"profile_id":"u2"}')
        self.assertEqual(run(other)[0][1].properties, '{"profile_id":"u2","self_view":false,"enriched_by":"enrich"}')

    def test_drops_test_traffic_and_counts_it(self):
        outcome, counters = run(event("app_opened", properties='{"is_test": true}'))
        self.assertEqual(outcome, ("drop", "test traffic"))
        self.assertEqual(counters, {"dropped_test_traffic": 1})
        self.assertEqual(run(event("app_opened", properties='{"is_test":1}'))[0][0], "keep")

    def test_properties_that_are_not_a_json_object_read_as_empty_and_are_replaced(self):
        for text in ["", "[]", "null", '{"a":1,}', '{"a" 1}', '{"a":1', "{} x"]:
            with self.subTest(text=text):
                self.assertEqual(run(event("app_opened", properties=text))[0][1].properties, '{"enriched_by":"enrich"}')

    def test_configuration(self):
        self.assertEqual(load_config("{}"), Config(("profile_viewed", "post_liked"), "is_test"))
        config = load_config('{"require_user":["app_opened"],"drop_flag":"qa"}')
        self.assertEqual(config, Config(("app_opened",), "qa"))
        self.assertEqual(run(event("app_opened"), config)[0], ("reject", "app_opened requires a user_id"))
        self.assertEqual(run(event("x", properties='{"qa":true}'), config)[0][0], "drop")
        for text in ["", "null", '{"drop_flag":1}', '{"other":1}', '{"drop_flag":"a","drop_flag":"b"}', '{"require_user":"x"}']:
            with self.subTest(text=text):
                self.assertRegex(load_config(text), r"^invalid plugin config: ")


class JsonObjectTest(unittest.TestCase):
    """The same cases as sdk-guest/src/lib.rs's tests."""

    def test_set_splices_and_keeps_the_other_members_bytes(self):
        o = JsonObject('{ "n": 18446744073709551616, "f": 1.0, "s": "a}\\"b", "o": {"x": [1, "]"]}, "t": false }')
        self.assertIs(o.get("t"), False)
        self.assertEqual(o.get("o"), {"x": [1, "]"]})
        self.assertEqual(o.get("s"), 'a}"b')
        o.set("t", "yes")
        o.set("added", {"k": [True]})
        o.set("f", 2)
        self.assertEqual(o.get("added"), {"k": [True]})
        self.assertEqual(
            o.text, '{ "n": 18446744073709551616, "f": 2, "s": "a}\\"b", "o": {"x": [1, "]"]}, "t": "yes","added":{"k":[true]} }'
        )

    def test_escaped_and_repeated_keys(self):
        o = JsonObject('{"a":1,"\\u0061":2,"b\\"":3}')
        self.assertEqual(o.get("a"), 2)
        self.assertEqual(o.get('b"'), 3)
        o.set("a", 9)
        o.set('q"', 1)
        self.assertEqual(o.text, '{"a":1,"\\u0061":9,"b\\"":3,"q\\"":1}')
        empty = JsonObject(" { } ")
        empty.set("k", 1)
        self.assertEqual(empty.text, ' { "k":1} ')


class ConfigJsonTest(unittest.TestCase):
    def test_numbers_and_depth_as_serde_json(self):
        value, has_floats = loads('{"a":[1.0,-0,2e20,18446744073709551616]}')
        self.assertTrue(has_floats)
        self.assertEqual(value["a"][0], 1.0)
        with self.assertRaises(ValueError):
            loads("[" * 128 + "]" * 128)
        loads("[" * 127 + "]" * 127)


if __name__ == "__main__":
    unittest.main()
