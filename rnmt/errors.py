"""The typed exceptions of the core. The CLI maps each to one line on stderr and exit 2."""


class RnmtError(Exception):
    """Base class: a problem the user can fix (bad input, bad file, bad option)."""


class DataError(RnmtError):
    """Unreadable, malformed or mismatched input text or binarised data."""


class CheckpointError(RnmtError):
    """A checkpoint that is missing, truncated, corrupt or of an incompatible version."""


class VocabularyMismatch(RnmtError):
    """Vocabularies that do not fit together (model vs data, ensemble members, shared embeddings)."""


class ConfigError(RnmtError):
    """Options that contradict each other or the data."""
