"""Fault injection for the elastic-restart test in test_distributed.py, loaded by Python at start-up
when this folder is on PYTHONPATH.

In rank 1 of torchrun's first attempt (TORCHELASTIC_RESTART_COUNT = 0) it wraps the trainer's step so
that the worker exits abruptly (code 17) right after step ``$PERGRAD_TEST_DIE_AT_STEP``, as a crash would.
"""

import os

if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import pergrad.train.loop as _loop

    _die_at = int(os.environ["PERGRAD_TEST_DIE_AT_STEP"])
    _step = _loop._step

    def _step_then_die(run, *args, **kwargs):
        _step(run, *args, **kwargs)
        if run.step == _die_at:
            os._exit(17)

    _loop._step = _step_then_die
