"""The one exception type mlxfam raises for bad input: its message names what is wrong."""


class MlxfamError(ValueError):
    """Bad input (model reference, file, tensor, config field, argument) explained in words."""
