"""t-SNE on one OpenMP thread vs all of them, for the sizes `cxr embed` maps.

`cxrkit.explain.embed.project` leaves scikit-learn's t-SNE on all OpenMP threads. This prints, per size, the
time on one thread and on all of them, to check that sharing pays even for the few thousand points of a map.

    python bench/tsne_threads.py --sizes 1000 2000 5000

The features are synthetic: 5 Gaussian clusters in 1,280 dimensions (the width of MobileNetV2's head input),
standardised and reduced to 50 principal components, as `project` does.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from options import positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=positive, nargs="+", default=[1000, 2000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.sizes) < 91:  # PCA to 50 components and perplexity 30 need that many points
        parser.error(f"--sizes {min(args.sizes)}: at least 91 points (PCA to 50, perplexity 30)")

    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from cxrkit.explain.embed import standardize

    rng = np.random.default_rng(args.seed)
    cores = len(os.sched_getaffinity(0))  # the cores this process may use, as cxrkit counts them
    print(f"{cores} cores; t-SNE with the parameters of cxrkit.explain.embed.project (PCA to 50, perplexity 30)")
    print(f"{'points':>7} {'1 thread s':>11} {f'{cores} threads s':>12} {'ratio':>6}")
    for n in args.sizes:
        centres = rng.normal(0, 3, (5, 1280))
        x = centres[rng.integers(0, 5, n)] + rng.normal(0, 1, (n, 1280))
        z = PCA(n_components=50, random_state=args.seed).fit_transform(standardize(x))
        times = {}
        for threads in (1, cores):
            start = time.perf_counter()
            with threadpool_limits(threads, user_api="openmp"):
                TSNE(n_components=2, perplexity=30, init="pca", learning_rate="auto",
                     random_state=args.seed).fit_transform(z)
            times[threads] = time.perf_counter() - start
        print(f"{n:>7} {times[1]:>11.1f} {times[cores]:>12.1f} {times[cores] / times[1]:>6.2f}")


if __name__ == "__main__":
    main()
