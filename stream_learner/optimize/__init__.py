"""Serving variants of every model version: int8, pruned, sparse and a distilled student.

See :mod:`stream_learner.optimize.variants` (the one function that builds a
variant), :mod:`~stream_learner.optimize.gate` (held-out accuracy and
latency against the parent), :mod:`~stream_learner.optimize.hook` (the
session hook the trainer and replay run), :mod:`~stream_learner.optimize.role`
(``stream-learner optimize``) and docs/architecture.md ("Variants").

This package's ``__init__`` imports nothing: the model builder imports
:mod:`~stream_learner.optimize.int8`.
"""
