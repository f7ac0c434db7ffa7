"""ragrt's runtime: open a bundle and answer questions. Imports no torch, transformers or optimum."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ragrt")
except _metadata.PackageNotFoundError:  # running from a source checkout
    __version__ = "0.1.0"

from ragrt.engine import Answer, AnswerStream, Engine, Source  # noqa: E402
from ragrt.errors import BundleError, CorpusError, RagrtError, UserInputError  # noqa: E402
from ragrt.decoding.prompt import Turn  # noqa: E402

__all__ = ["Engine", "Answer", "AnswerStream", "Source", "Turn", "RagrtError", "UserInputError", "CorpusError",
           "BundleError", "__version__"]
