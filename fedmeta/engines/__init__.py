"""Engines and their backends: one per ``simulation.engine``, each running a round's clients.

An engine is an :class:`~.base.Engine` object registered by name (:data:`fedmeta.registry.ENGINES`);
:func:`fedmeta.api.run` calls ``engine.run(cfg, components, ...)`` and never branches on the name.

``sequential`` (:class:`~.sequential.SequentialBackend`), ``vectorized``
(:class:`~.vectorized.VectorizedBackend`) and ``flower``
(:class:`~.flower.FlowerBackend`, with :class:`~.messages.MetaStrategy`
building and validating its messages). They only move tensors and messages:
the round loop is :mod:`fedmeta.federation`, a client's work is
:mod:`fedmeta.client`, the maths is :mod:`fedmeta.meta` and :mod:`fedmeta.privacy`.
"""
