"""The plain per-query TTT loop a user writes, and a process that runs it as the user's own process would.

``plain_loop``: per query a deep copy of the last layer, a new ``torch.optim.Adam``, ``steps`` full-batch steps.
Run as a script (``python benchmarks/ttt_loop.py DIR THREADS``) it loads the problem that ``bench_ttt.py`` saved in
``DIR`` and answers requests on stdin (``START STOP``: run the loop on those queries) with one JSON line on stdout
(wall and CPU milliseconds, predictions). It imports torch and numpy only, never the toolkit, so it runs under
the OpenMP wait policy of its environment: libgomp's default unless the user set one, not the sleeping policy
the toolkit sets for itself. A loop of tiny operations runs about twice as fast under the default policy on 2
cores (its fork-joins do not wake sleeping threads), so this is the baseline at its own best.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def plain_loop(last: nn.Linear, x_train, y_train, x_query, neighbours, lr: float, steps: int) -> np.ndarray:
    """Per query: a deep copy of ``last``, a new Adam, ``steps`` full-batch steps on its neighbours; predictions."""
    out = []
    for i in range(len(x_query)):
        layer = copy.deepcopy(last)
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        z, t = torch.from_numpy(x_train[neighbours[i]]), torch.from_numpy(y_train[neighbours[i]])
        for _ in range(steps):
            loss = nn.functional.cross_entropy(layer(z), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(int(layer(torch.from_numpy(x_query[i:i + 1])).argmax(1)))
    return np.asarray(out)


def save_problem(folder: Path, last: nn.Linear, x_train, y_train, x_query, neighbours, lr: float,
                 steps: int) -> None:
    """What the worker process needs, written by the benchmark."""
    np.savez(folder / "problem.npz", x_train=x_train, y_train=y_train, x_query=x_query, neighbours=neighbours,
             weight=last.weight.detach().numpy(), bias=last.bias.detach().numpy(), lr=lr, steps=steps)


def serve(folder: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    with np.load(folder / "problem.npz") as z:
        p = {k: z[k] for k in z.files}
    last = nn.Linear(p["weight"].shape[1], p["weight"].shape[0])
    with torch.no_grad():
        last.weight.copy_(torch.from_numpy(p["weight"]))
        last.bias.copy_(torch.from_numpy(p["bias"]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        start, stop = map(int, line.split())
        wall, cpu = time.perf_counter(), time.process_time()
        preds = plain_loop(last, p["x_train"], p["y_train"], p["x_query"][start:stop], p["neighbours"][start:stop],
                           float(p["lr"]), int(p["steps"]))
        print(json.dumps({"wall_ms": 1e3 * (time.perf_counter() - wall), "cpu_ms": 1e3 * (time.process_time() - cpu),
                          "predictions": preds.tolist()}), flush=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
