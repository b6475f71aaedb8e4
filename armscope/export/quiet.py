"""TensorFlow, Keras and absl talk on the terminal while models load and trace; the
user should see armscope's messages only. A module of its own because every module
that touches TensorFlow needs it, including the ones keras_io itself imports."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings


@contextlib.contextmanager
def quiet_libraries():
    """Keep TensorFlow/Keras/absl warnings (no training config, compiled metrics,
    deprecated arguments) out of the user's terminal while models load and trace."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    loggers = [logging.getLogger(n) for n in ("tensorflow", "absl", "keras", "tf_keras", "h5py")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
