"""The main job: the whole loop on local servers, with a drift, measured from the outside.

:func:`run_demo` starts Tansu and Valkey, a ``stream-learner run`` process
(joiner + trainer) and a ``stream-learner serve`` process (the reference
serving node), then plays a simulated application against the node over
HTTP: requests come from River's Agrawal generator whose concept changes
abruptly at a known request (classification function 0 -> 2); the true label
of each request is sent later, after a random delay, and for a fraction of
requests never. The node serves the newest verified checkpoint it has and
logs each prediction with the version that served it; the joiner joins
predictions with labels; the trainer learns and publishes checkpoints; the
node hot-swaps them. The application scores every response against the
truth, so the served accuracy it reports is what users would have seen.

A monitor reads the examples, model and drift topics to report the join by
kind, the checkpoints, when the drift was detected, and the freshness of
each label: from the moment the application sent it to the moment the node
served a model whose manifest says it trained on that label's example.

Afterwards the model version served when the concept changed answers every
request again, read back from the model topic, to show what users would
have been served without learning (:mod:`.baseline`).

The trainer also derives the serving variants ``DemoConfig.variants`` asks
for (``trainer_variants``: int8, sparse and the distilled student by
default) from every version and gates them; the report lists its decisions
and, for each variant some version of which passed, replays a node started
with ``--serving-variant`` on the same requests, with the node's own choice
between the variant and the fp32 model, so the variant's accuracy stands
next to the fp32 model's on the same requests, with its latency and what
fell back to fp32 and why (:mod:`.variants`).

Writes ``summary.json`` and ``report.html`` (an SVG plot of served accuracy
over time, with and without learning and for each replayed variant, marked
with the drift, its detection and the model versions, the latency on the
same time axis, and the variants' table) to the output directory.

* :mod:`.app` — the simulated application and its traffic;
* :mod:`.monitor` — what the topics say while it runs, the progress line;
* :mod:`.baseline` — the static model's answers to the same requests;
* :mod:`.variants` — the gate's decisions, and a variant-following node replayed;
* :mod:`.curves` — the rolling accuracy curves the summary and the plot share;
* :mod:`.summary` — the summary (``summary.json``) and its text;
* :mod:`.plot` — the SVG plot of served accuracy and latency over time;
* :mod:`.report` — the HTML page: the plot, the variants' table, the summary;
* :mod:`.job` — the orchestration: servers, processes, warm-up, the wait.
"""

from .app import DemoConfig, demo_rows
from .job import run_demo
from .summary import describe

__all__ = ["DemoConfig", "demo_rows", "describe", "run_demo"]
