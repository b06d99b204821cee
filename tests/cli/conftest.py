"""What the command-line tests share."""

import pytest


@pytest.fixture(scope="module")
def calibration_flags(tiny_text_file):
    """A short calibration set: enough for every method to run on the tiny model."""
    return ["--calib", str(tiny_text_file), "--nsamples", "6", "--seqlen", "48", "--quiet"]
