"""Exceptions of the MedFM engine.

Every error a user can cause is a ``MedFMError`` whose message names the problem (the file, key,
axis, index or value at fault). Input errors are also ``ValueError`` so that generic callers that
catch ``ValueError`` keep working.
"""


class MedFMError(Exception):
    """Base class of all MedFM errors."""


class InputError(MedFMError, ValueError):
    """Bad input from the user: an image, prompt, file or option that cannot be used."""


class InputIndexError(InputError, IndexError):
    """A slice or voxel index outside the volume (also an ``IndexError``)."""


class InputTypeError(InputError, TypeError):
    """An input of the wrong type, e.g. a float where an index is needed (also a ``TypeError``)."""


class ModelError(MedFMError, RuntimeError):
    """A model that cannot be built or loaded (unknown name, missing or corrupt checkpoint)."""


class ChecksumError(ModelError):
    """A file whose sha256 does not match the one expected."""


class Cancelled(MedFMError):
    """Raised when long work was stopped by its ``should_stop`` callback."""
