"""Triton kernels in Triton's interpreter, for the tests that run them on CPU.

Triton decides at @triton.jit time whether a kernel is interpreted (and checks again when it runs): a test module
imports its kernels `with interpreted():` and marks its tests `pytest.mark.usefixtures("triton_interpret")`
(tests/conftest.py); between the two, TRITON_INTERPRET is as it was, so that servers started by other tests do not
inherit it.
"""
import contextlib
import os


@contextlib.contextmanager
def interpreted():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous
