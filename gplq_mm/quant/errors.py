"""Exceptions of the quantization core."""


class NonFiniteError(ValueError):
    """Calibration data (activations, QwT rows) hold NaN or inf.

    Raised by the observers and the QwT sums; callers that know where the
    data came from (the calibration hook, ``tools/gplq_quantize.py``) catch it
    by type and add the image paths.
    """
