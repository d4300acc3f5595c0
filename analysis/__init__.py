"""Concept analysis on SAE codes. The shared core sits here (spaces, neighbours with its dense_index and code_index
backends, code_search, space_index, neighbourhoods, heads, local_ttt, batched_ttt, parents, sae_record, stats,
figures); the studies are packages on it: concepts/, ttt/, theory/; run/ and report/ sit on top. Core entry points:
``spaces.make_space``, ``neighbours.NeighbourIndex``, ``heads.train_head``, ``local_ttt.LocalTTT``."""

import artifacts.threads  # noqa: E402,F401  (sleeping OpenMP threads, before torch loads)
