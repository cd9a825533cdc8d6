"""The math of `align inspect embeddings`, torch only: cosine neighbours, analogies with their rank, how well a space
groups words by class (nearest-neighbour agreement, k-means purity), and a 2-D PCA map.

Every function takes plain tensors and lists, so tests run them on hand-made matrices.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import torch


def unit_rows(x):
    """Each row scaled to length 1 (a zero row stays 0): `(N, D)` -> `(N, D)` float64."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(queries, vectors):
    """Cosine similarity of each query with each vector: `(Q, D)`, `(N, D)` -> `(Q, N)`."""
    return unit_rows(queries) @ unit_rows(vectors).T


def nearest(query, vectors, words: Sequence[str], k: int, exclude: set[str] | None = None) -> list[tuple[str, float]]:
    """The `k` words whose vectors have the highest cosine with `query` `(D,)`, `vectors` `(N, D)` in `words` order,
    leaving out `exclude` (e.g. the query word itself). Ties keep the vocabulary order."""
    sims = cosine_matrix(query[None], vectors)[0]
    order = sorted(range(len(words)), key=lambda i: (-float(sims[i]), i))
    out = []
    for i in order:
        if exclude and words[i] in exclude:
            continue
        out.append((words[i], float(sims[i])))
        if len(out) == k:
            break
    return out


def analogy(va, vb, vc, vectors, words: Sequence[str], *, exclude: set[str], expected: str | None = None,
            k: int = 5) -> dict:  # fmt: skip
    """a - b + c ("king - man + woman"): the words nearest (cosine) to unit(a) - unit(b) + unit(c), 3CosAdd of
    Mikolov et al. 2013 (https://arxiv.org/abs/1301.3781) as Levy & Goldberg 2014 state it, with the three
    inputs left out of the answers. `rank` is the 1-based place of `expected` among all candidates (None when not
    asked, or when it is not a candidate)."""
    a, b, c = (unit_rows(torch.as_tensor(v)[None])[0] for v in (va, vb, vc))
    target = a - b + c
    sims = cosine_matrix(target[None], vectors)[0]
    order = [i for i in sorted(range(len(words)), key=lambda i: (-float(sims[i]), i)) if words[i] not in exclude]
    top = [(words[i], float(sims[i])) for i in order[:k]]
    rank = None
    if expected is not None:
        ranked = [words[i] for i in order]
        rank = ranked.index(expected) + 1 if expected in ranked else None
    return {"top": top, "rank": rank, "candidates": len(order)}


def knn_class_agreement(vectors, labels: Sequence[str], k: int = 1) -> float:
    """Mean over words of the share of its `k` nearest other words (cosine) that have its class."""
    sims = cosine_matrix(vectors, vectors)
    sims.fill_diagonal_(-torch.inf)  # a word is not its own neighbour
    total = 0.0
    for i in range(len(labels)):
        order = sorted(range(len(labels)), key=lambda j: (-float(sims[i, j]), j))[:k]
        total += sum(labels[j] == labels[i] for j in order) / k
    return total / len(labels)


def chance_nn_agreement(labels: Sequence[str]) -> float:
    """Expected 1-NN class agreement when the neighbour is any other word: sum_c n_c (n_c - 1) / (N (N - 1))."""
    n = len(labels)
    return sum(m * (m - 1) for m in Counter(labels).values()) / (n * (n - 1))


def silhouette(vectors, labels: Sequence[str]) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) with cosine distance 1 - cos: per word, a = mean distance to the
    other words of its class, b = the smallest mean distance to another class, s = (b - a) / max(a, b) (0 for a
    class of one). From -1 to 1; unlike the agreement and purity it does not saturate once classes are separable:
    it says by how much."""
    dist = 1 - cosine_matrix(vectors, vectors)
    labels = list(labels)
    classes = sorted(set(labels))
    members = {c: torch.tensor([j for j, lab in enumerate(labels) if lab == c]) for c in classes}
    total = 0.0
    for i, c in enumerate(labels):
        own = members[c][members[c] != i]
        if len(own) == 0:
            continue
        a = float(dist[i, own].mean())
        b = min(float(dist[i, members[o]].mean()) for o in classes if o != c)
        total += 0.0 if max(a, b) == 0 else (b - a) / max(a, b)
    return total / len(labels)


def purity(labels: Sequence[str], clusters: Sequence[int]) -> float:
    """Cluster purity (Manning et al., IR book, 16.3): each cluster counts its most common class; the sum over N."""
    by_cluster: dict[int, Counter] = {}
    for label, cluster in zip(labels, clusters, strict=True):
        by_cluster.setdefault(cluster, Counter())[label] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(labels)


def kmeans(vectors, k: int, *, seed: int = 0, n_init: int = 10, iters: int = 100) -> list[int]:
    """Cluster ids of spherical k-means (rows scaled to length 1, so cosine is the distance that counts): Lloyd's
    iterations from k-means++ starts (Arthur & Vassilvitskii 2007), the best of `n_init` by within-cluster sum of
    squares. Deterministic for a seed."""
    x = unit_rows(vectors)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k={k} for {n} points")
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centers = [x[int(torch.randint(n, (1,), generator=gen))]]
        for _ in range(1, k):
            d2 = torch.cdist(x, torch.stack(centers)).min(1).values.square()
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
            centers.append(x[int(torch.multinomial(p, 1, generator=gen))])
        c = torch.stack(centers)
        assign = None
        for _ in range(iters):
            new = torch.cdist(x, c).argmin(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            for j in range(k):
                members = x[assign == j]
                if len(members):
                    c[j] = members.mean(0)
        inertia = float((x - c[assign]).square().sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = assign.tolist(), inertia
    return best


def chance_purity(labels: Sequence[str], clusters: Sequence[int], *, seed: int = 0, draws: int = 200) -> float:
    """Mean purity of the same cluster sizes with the classes shuffled: what purity a space with no class structure
    gets (it is above 1/#classes because each cluster takes its most common class)."""
    rng = random.Random(seed)
    shuffled = list(labels)
    total = 0.0
    for _ in range(draws):
        rng.shuffle(shuffled)
        total += purity(shuffled, clusters)
    return total / draws


def class_grouping(vectors, labels: Sequence[str], *, seed: int = 0) -> dict:
    """How well a space groups words by class: 1-NN and 5-NN class agreement, k-means purity with k = #classes,
    each beside its chance level, and the silhouette (cosine distance)."""
    k = len(set(labels))
    clusters = kmeans(vectors, k, seed=seed)
    return {
        "words": len(labels),
        "classes": dict(sorted(Counter(labels).items())),
        "nn_agreement": knn_class_agreement(vectors, labels, k=1),
        "nn_agreement_chance": chance_nn_agreement(labels),
        "knn5_agreement": knn_class_agreement(vectors, labels, k=5),
        "kmeans_purity": purity(labels, clusters),
        "kmeans_purity_chance": chance_purity(labels, clusters, seed=seed),
        "silhouette": silhouette(vectors, labels),
        "clusters": clusters,
    }


def pca_2d(vectors) -> tuple[list[list[float]], list[float]]:
    """The rows projected on their first two principal components (centered; SVD), and the share of the variance
    each explains. Signs are fixed so the largest |coordinate| of each component is positive (SVD's sign is free)."""
    x = torch.as_tensor(vectors, dtype=torch.float64)
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    coords = x @ vh[:2].T
    for j in range(coords.shape[1]):
        if coords[coords[:, j].abs().argmax(), j] < 0:
            coords[:, j] = -coords[:, j]
    var = s.square()
    share = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
    return coords.tolist(), share
