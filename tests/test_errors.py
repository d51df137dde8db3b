"""What users read when something fails: one line, naming the problem."""

import os

import pytest
from torch._utils import ExceptionWrapper

from cxrkit.errors import CxrError, printable, user_message


def test_an_error_raised_again_by_a_dataloader_worker_reads_as_the_original():
    message = "scan.dcm: multi-frame DICOM (3 frames) is not supported; export a single frame"
    try:
        raise CxrError(message)
    except CxrError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a worker sends back
    with pytest.raises(CxrError) as caught:
        wrapped.reraise()
    assert "Original Traceback" in str(caught.value)
    assert user_message(caught.value) == message
    assert user_message(CxrError("a.png: empty file (0 bytes)")) == "a.png: empty file (0 bytes)"


@pytest.mark.parametrize(("text", "shown"), [
    ("plain/name.png", "plain/name.png"),
    ("Ünïcödé 肺炎 & <b>", "Ünïcödé 肺炎 & <b>"),  # printable as it is
    (os.fsdecode(b"bad\xff.png"), "bad\\xff.png"),  # a file name that is not UTF-8
    ("cr\rx.png", "cr\\rx.png"),
    ("tab\tand\nnewline\x1b", "tab\\tand\\nnewline\\x1b"),
    ("lone\ud800", "lone\\ud800"),
])
def test_printable_spells_out_what_utf8_text_on_one_line_cannot_hold(text, shown):
    assert printable(text) == shown
    printable(text).encode("utf-8")
