"""Runnable jobs built on the core: they start servers and pipeline roles and check them from outside.

* :mod:`.demo` — the main job (``stream-learner demo``): the whole loop on
  local servers, with a drift, measured from the outside, with a report;
* :mod:`.smoke` — a count check (``stream-learner smoke``): SDK -> decoder and
  dead letters -> joiner -> trainer, every event accounted for.

These are not pipeline stages: nothing in the core imports them, and a
deployment runs none of them.
"""
