"""The one error type users see.

Every mistake a user can make (a wrong path, a corrupt image, an unknown key in a recipe, missing weights) raises
:class:`CxrError` with a one-line message that names the file or key and the problem. The CLI prints it as one line
and exits non-zero; ``CXR_DEBUG=1`` shows the traceback.
"""


class CxrError(Exception):
    """A user-facing error with a one-line message."""


class NotAnImage(CxrError):
    """The data is not in an image format cxrkit reads (as opposed to an image that is damaged): the service answers
    415 for it, whatever the upload's name says."""


def first_line(err: BaseException) -> str:
    """An exception's message as one short line for a user: its first non-blank line with object addresses
    (``<_io.BytesIO object at 0x7f...>``) left out, or the exception's type name when the message is empty. A first
    line that ends in a colon announces the next lines, so up to three of them follow it, joined by ``; `` (pydicom:
    ``Unable to decode as exceptions were raised by all available plugins:`` and one line per plugin)."""
    import re

    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:4])}"
    return lines[0] if lines else type(err).__name__


def os_error(err: BaseException) -> OSError | None:
    """The OSError (a full disk, a read-only one) behind ``err``: ``err`` itself or one it was raised from or while
    handling, as when a library wraps the failed write of its output in an error of its own; None when there is
    none."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):  # a Ctrl-C is never taken for a failed write
            return None
        if isinstance(current, OSError) and (current.errno is not None or current is err):
            return current  # a wrapped one without an errno is another library's error, not the system's
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def cannot_write(path: object, cause: OSError) -> CxrError:
    """The one-line error for a failed write of ``path``: ``<path>: cannot write (<the system's reason>)``."""
    return CxrError(f"{path}: cannot write ({cause.strerror or first_line(cause)})")


def printable(text: str) -> str:
    """``text`` as one line of UTF-8: the bytes of a file name that is not UTF-8 (which Python keeps as lone
    surrogates) spelt ``\\xff``, and control characters (a carriage return in a file name) spelt ``\\r``, ``\\x1b``.
    Text without them is returned as it is."""
    import re

    if text.isascii() and text.isprintable():
        return text
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name made
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def user_message(err: CxrError) -> str:
    """What to print for ``err``: its message, or, when a DataLoader worker raised it (PyTorch raises it again in the
    main process as ``"Caught CxrError in DataLoader worker process 0. Original Traceback ..."``), the original
    message from the traceback's last line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{CxrError.__module__}.CxrError: ") else last
    return text
