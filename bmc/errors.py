"""The kit's one error base class.

Every error that a user's input, file or device can cause — a bad image, a model that does not fit
its card, a refused adaptation, an unplugged camera — is a :class:`BmcError`, raised with a message
that says what and where. The command line catches it once (``bmc.cli``) and prints that one line
with exit status 2; anything else is a bug and keeps its traceback. Each domain error also keeps
the built-in class it has always been (``ValueError``, ``RuntimeError``, ``OSError``), so callers
that catch those still do.
"""


class BmcError(Exception):
    """An expected error: one clear line for the user, naming what and where."""
