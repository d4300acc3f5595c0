"""The TTT study on a store: global head, local TTT and kNN vote, resumable chunks, masks (O2), dense-sparse
agreement (O3), locality, sweeps and the backbone-width sweep. Entry points: ``study.ttt_study``,
``chunks.evaluate``, ``masks.masked_ttt``, ``scaling.width_sweep``."""
