"""The one error type users see.

Every mistake a user can make (a wrong path, a corrupt image, an unknown key in a recipe, missing weights) raises
:class:`CxrError` with a one-line message that names the file or key and the problem. The CLI prints it as one line
and exits non-zero; ``CXR_DEBUG=1`` shows the traceback.
"""


class CxrError(Exception):
    """A user-facing error with a one-line message."""
