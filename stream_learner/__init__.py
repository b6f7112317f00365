"""stream-learner: keep a deployed PyTorch model learning from its own Kafka traffic."""

from .config import Settings, load_settings
from .errors import ConfigError, EventError, StreamLearnerError
from .sdk import PredictionLogger

__all__ = ["ConfigError", "EventError", "PredictionLogger", "Settings", "StreamLearnerError", "load_settings"]
__version__ = "0.1.0"
