"""The exceptions users see: every message names the file or value at fault and the fix."""


class StopsignError(Exception):
    """A problem the user can fix (bad data, a missing file, an unusable checkpoint)."""


class DataError(StopsignError):
    """The data set cannot be used as given; the message lists every offending entry."""


class ImageError(StopsignError):
    """One image file cannot be decoded; the message is the reason, for the skipped-files list."""


class CheckpointError(StopsignError):
    """A checkpoint is missing, unsafe, or does not describe a stopsign classifier."""


class Interrupted(StopsignError):
    """Ctrl-C during training or tuning: what finished is written; the message says how to resume."""


class StorageError(StopsignError):
    """A URL cannot be read or written: no credentials, refused ones, no such bucket or key, no answer."""
