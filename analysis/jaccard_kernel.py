"""The compiled kernel of ``neighbourhoods._mean_jaccard``: the mean Jaccard overlap of the concept sets of every
pair of neighbours, from each neighbourhood's entries sorted by latent (its plain twin is
``neighbourhoods.neighbourhood_stats_reference``). A module of its own so that numba loads only where the
statistics are computed."""

import numba
import numpy as np


@numba.njit(cache=True, parallel=True)
def jaccard_kernel(lat, is_active, neighbour_of, sizes, n_slices, out):
    m, width = lat.shape
    n_nb = sizes.shape[1]
    for t in numba.prange(n_slices):
        inter = np.zeros((n_nb, n_nb), dtype=np.int64)
        members = np.empty(n_nb, dtype=np.int64)
        for q in range(t, m, n_slices):
            e = 0
            while e < width:
                if not is_active[q, e]:
                    e += 1
                    continue
                c = 0
                latent = lat[q, e]
                while e < width and lat[q, e] == latent:
                    members[c] = neighbour_of[q, e]
                    c += 1
                    e += 1
                for a in range(c):
                    for b in range(a + 1, c):
                        inter[members[a], members[b]] += 1
            total = 0.0
            for i in range(n_nb):
                for j in range(i + 1, n_nb):
                    shared = inter[i, j] + inter[j, i]
                    union = sizes[q, i] + sizes[q, j] - shared
                    if union > 0:
                        total += shared / union
                    inter[i, j] = 0
                    inter[j, i] = 0
            out[q] = total / (n_nb * (n_nb - 1) / 2)
