"""What users read when something fails: one line, naming the problem."""

import pytest
from torch._utils import ExceptionWrapper

from cxrkit.errors import CxrError, user_message


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
