"""OpenMP threads that sleep instead of spinning, for every entry point of the toolkit.

GNU OpenMP (torch's, and the copies inside FAISS and numba) keeps its worker threads spinning for a while after
each parallel region. On shared cores that spinning starves the next stage's many small parallel operations: a
full digits run spent 45 s in local TTT after the concept stage (FAISS and numba pools still spinning) against
7.9 s with ``OMP_WAIT_POLICY=PASSIVE`` (BENCHMARKS.md, "Under a co-running job"). The policy is read once, when
each OpenMP runtime loads, so it is set when this module is imported: by every package of the project before it
imports torch, FAISS or numba. A value already in the environment wins; a program that loaded torch before the
toolkit keeps the policy torch started with.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
