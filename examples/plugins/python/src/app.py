"""The component's entry point: the ``plugin`` world of wit/plugin.wit
(weir:plugin@0.1.0). componentize-py generates the ``wit_world`` package at build time:
``WitWorld.process`` is the export, ``wit_world.imports.host`` the host's functions,
``wit_world.imports.types`` the event record and the outcome variant."""

from enrich import enrich, load_config
from wit_world import WitWorld as Plugin
from wit_world.imports import host
from wit_world.imports.types import Outcome_Drop, Outcome_Keep, Outcome_Reject

_OUTCOMES = {"keep": Outcome_Keep, "drop": Outcome_Drop, "reject": Outcome_Reject}

# Read once per instance, at the first batch (the host's imports are not callable
# while componentize-py initialises the module at build time).
_config = None


class WitWorld(Plugin):
    def process(self, events):
        global _config
        if _config is None:
            _config = load_config(host.config())
        if isinstance(_config, str):
            return [Outcome_Reject(_config) for _ in events]
        config = _config
        counter_add = host.counter_add
        return [_OUTCOMES[kind](value) for kind, value in (enrich(e, config, counter_add) for e in events)]
