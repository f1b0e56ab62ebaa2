"""Unit tests of the plugin's logic, run natively (no build needed):
``python3 -m unittest discover -s tests -v`` in examples/plugins/python."""

import sys
import unittest
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from enrich import Config, enrich, load_config
from serde_json_compat import JsonObject, dumps, loads


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
        self.assertEqual(kept.properties, '{"a":1,"b":2,"enriched_by":"enrich"}')
        self.assertEqual(kept.context, '{"x":  1}')

    def test_profile_views_need_a_user_and_a_profile(self):
        self.assertEqual(run(event("profile_viewed"))[0], ("reject", "profile_viewed requires a user_id"))
        self.assertEqual(run(event("post_liked"))[0], ("reject", "post_liked requires a user_id"))
        no_profile = event("profile_viewed", "u1", '{"profile_id":7}')
        self.assertEqual(run(no_profile)[0], ("reject", "profile_viewed needs a string properties.profile_id"))
        own = event("profile_viewed", "u1", '{"profile_id":"u1"}')
        self.assertEqual(run(own)[0][1].properties, '{"enriched_by":"enrich","profile_id":"u1","self_view":true}')
        other = event("profile_viewed", "u1", '{"profile_id":"u2"}')
        self.assertEqual(run(other)[0][1].properties, '{"enriched_by":"enrich","profile_id":"u2","self_view":false}')

    def test_drops_test_traffic_and_counts_it(self):
        outcome, counters = run(event("app_opened", properties='{"is_test": true}'))
        self.assertEqual(outcome, ("drop", "test traffic"))
        self.assertEqual(counters, {"dropped_test_traffic": 1})
        self.assertEqual(run(event("app_opened", properties='{"is_test":1}'))[0][0], "keep")

    def test_properties_that_are_not_a_json_object_read_as_empty(self):
        # The last one: serde_json fails on the lone surrogate even though a repeated key
        # replaces the string that holds it.
        for text in ["", "[]", "null", '{"a":1,}', '{"a":NaN}', '{"a":1e400}', '{"a":"\\ud800"}',
                     '{"x":{"\\ud8000":1},"x":2}']:
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


class SerdeJsonCompatTest(unittest.TestCase):
    def test_reads_and_writes_as_serde_json(self):
        cases = [
            ('{"b":1,"a":{"d":[1.0,-0,2e20],"c":1E-7}}', '{"a":{"c":1e-7,"d":[1.0,-0.0,2e+20]},"b":1}'),
            ('{"x":0.00001,"y":1e15,"z":1e16}', '{"x":0.00001,"y":1000000000000000.0,"z":1e+16}'),
            ('{"big":18446744073709551615,"bigger":18446744073709551616,"neg":-9223372036854775809}',
             '{"big":18446744073709551615,"bigger":1.8446744073709552e+19,"neg":-9.223372036854776e+18}'),
            # Code point order: U+E000 sorts before U+1F600.
            ('{"s":"\\u00e9\\ud83d\\ude00\\/\\u0001\\n","\\ud83d\\ude00":2,"\\uE000":1}',
             '{"s":"é😀/\\u0001\\n","\ue000":1,"😀":2}'),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(JsonObject(text).dumps(), expected)
                self.assertEqual(dumps(loads(text)[0]), expected)

    def test_depth_limit(self):
        self.assertEqual(JsonObject('{"a":' + "[" * 127 + "]" * 127 + "}").data, {})
        self.assertNotEqual(JsonObject('{"a":' + "[" * 126 + "]" * 126 + "}").data, {})


if __name__ == "__main__":
    unittest.main()
