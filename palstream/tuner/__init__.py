"""The tuner: a contextual bandit that picks the encoder configuration for each batch of units.

- :mod:`~palstream.tuner.space`: the arms, named and validated ``EncoderConfig`` overrides;
- :mod:`~palstream.tuner.features`: cheap content statistics of a batch (the context);
- :mod:`~palstream.tuner.reward`: reward components and their job-set weights;
- :mod:`~palstream.tuner.agent`: LinUCB over those, with a versioned policy file;
- :mod:`~palstream.tuner.offline`: measuring every arm on clips, pretraining (``palstream tune``).

The batch system's side (ledger, decisions, resume, replay) is ``palstream.batch.tuned``, and the
quality floor ``palstream.quality``: nothing here imports ``palstream.batch``. See ``docs/tuner.md``.
"""
