"""User-facing errors: raised for bad input, shown as one clear line (CLI exit 2, app message)."""


class LabError(Exception):
    """A problem the user can fix (bad name, bad value, missing data). Never a bug."""


class InvalidParameter(LabError):
    def __init__(self, name: str, value, valid: str):
        self.name, self.value, self.valid = name, value, valid
        super().__init__(f"invalid {name}={value!r}: must be {valid}")


class DataUnavailable(LabError):
    """The dataset is not on disk and cannot be downloaded."""


class CorruptCacheEntry(LabError):
    """A cached file could not be loaded; it is treated as missing."""
