"""Backends: one per ``simulation.engine``, each running a round's clients.

``sequential`` (:class:`~.sequential.SequentialBackend`), ``vectorized``
(:class:`~.vectorized.VectorizedBackend`) and ``flower``
(:class:`~.flower.FlowerBackend`, with :class:`~.messages.MetaStrategy`
building and validating its messages). They only move tensors and messages:
the round loop is :mod:`fedmeta.federation`, a client's work is
:mod:`fedmeta.client`, the maths is :mod:`fedmeta.meta` and :mod:`fedmeta.privacy`.
"""
