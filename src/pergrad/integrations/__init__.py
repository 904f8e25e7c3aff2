"""pergrad where a framework owns the training loop and calls ``loss.backward()`` itself.

- :mod:`pergrad.integrations.lightning`: ``PergradCallback``, a Lightning ``Callback``.
- :mod:`pergrad.integrations.transformers`: ``PergradCallback``, a Hugging Face ``TrainerCallback``.

Both attach :class:`~pergrad.PerExample` to the model, read each optimizer step's gathered
result (``pe.result``), merge it over data-parallel workers
(:func:`pergrad.distributed.merge_result`, one ``all_reduce``) and log the smoothed statistics
under ``pergrad/``. Each module imports its framework when it is imported, so ``import pergrad``
needs neither; they are not imported here.
"""
