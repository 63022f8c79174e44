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


def option_flag(name: str) -> str:
    """The command-line spelling of a config field, for messages: `max_len_a` → `--max-len-a`."""
    return "--" + name.replace("_", "-")


# torch's messages for a failed CPU allocation, a failed CUDA one, and a size past any
# address space (`--beam 10**17` over a batch of 64 rows).
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Storage size calculation overflowed")


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: Python's `MemoryError`, or torch's `RuntimeError` (its
    `OutOfMemoryError` included) for an allocation that failed or could not be sized."""
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in _OUT_OF_MEMORY))
