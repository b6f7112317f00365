"""``python -m stream_learner``: the command line (what torchrun and the trainer's launcher start)."""

from .cli import main

raise SystemExit(main())
