"""The errors ragrt raises on purpose. The CLI prints their message on one line and exits 2."""


class RagrtError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class UserInputError(RagrtError):
    """A bad argument, question or request."""


class CorpusError(RagrtError):
    """A corpus file that cannot be read; the message names the file and line."""


class BundleError(RagrtError):
    """A bundle that is missing, corrupted, or built by an incompatible version."""
