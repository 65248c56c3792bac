"""Partitioners: pure, seeded functions of the labels that return one index array per client.

Each partitioner is a function of ``(labels, num_clients, seed, **params)`` and nothing else, so a
partition can be recomputed anywhere (and checked against the ``partition.json`` a run saves).
Returned arrays hold positions into ``labels``, sorted, disjoint.

References: NIID-Bench (Li et al., "Federated Learning on Non-IID Data Silos: An Experimental
Study", ICDE 2022) for Dirichlet label skew, #C=k label skew and Dirichlet quantity skew; FedPhD
(Long et al. 2025, ``utils/data/cifar10.py``) for the deterministic pathological shard rule.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

Partition = list[np.ndarray]


class PartitionError(ValueError):
    """The requested partition cannot be made (e.g. more clients than samples)."""


def _finish(parts: list[list[int] | np.ndarray]) -> Partition:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _check(num_samples: int, num_clients: int, min_samples: int = 1) -> None:
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
    if num_samples < num_clients * min_samples:
        raise PartitionError(
            f"{num_samples} samples cannot give {num_clients} clients at least {min_samples} each: lower "
            f"partition.num_clients (at most {num_samples // max(min_samples, 1)} here) or partition.min_samples, "
            "or use more data (data.max_train_samples)"
        )


def iid(labels: np.ndarray, num_clients: int, seed: int) -> Partition:
    """Uniformly random, equal-size split (sizes differ by at most one)."""
    _check(len(labels), num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return _finish(np.array_split(perm, num_clients))


def dirichlet(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5, min_samples: int = 10,
    max_tries: int = 1000,
) -> Partition:
    """Label skew: each class is split over clients by proportions drawn from Dirichlet(alpha).

    As in NIID-Bench: a client already holding more than N/num_clients samples gets no more of
    later classes, and the whole draw is repeated until every client has ``min_samples``.
    Smaller ``alpha`` means stronger skew.
    """
    _check(len(labels), num_clients, min_samples)
    if alpha <= 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            open_ = np.array([len(part) < n / num_clients for part in parts])
            p = p * open_
            # A tiny alpha can put all the mass on full clients (or underflow to zeros): split the
            # class evenly over the clients still under N/num_clients instead of dividing 0/0.
            # Some client is always open while samples remain, since the full ones hold < N.
            total = p.sum()
            p = p / total if total > 0 else open_ / open_.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return _finish(parts)
    raise PartitionError(
        f"dirichlet(alpha={alpha}) gave a client fewer than {min_samples} samples in {max_tries} "
        "draws; raise alpha or lower partition.min_samples"
    )


def quantity(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5, min_samples: int = 10,
    max_tries: int = 10000,
) -> Partition:
    """Quantity skew: client sizes ~ Dirichlet(alpha) over a random permutation (labels IID)."""
    _check(len(labels), num_clients, min_samples)
    rng = np.random.default_rng(seed)
    n = len(labels)
    perm = rng.permutation(n)
    for _ in range(max_tries):
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p) * n).astype(int)[:-1]
        sizes = np.diff(np.concatenate([[0], cuts, [n]]))
        if sizes.min() >= min_samples:
            return _finish(np.split(perm, cuts))
    raise PartitionError(
        f"quantity(alpha={alpha}) gave a client fewer than {min_samples} samples in {max_tries} "
        "draws; raise alpha or lower partition.min_samples"
    )


def pathological(
    labels: np.ndarray, num_clients: int, seed: int, classes_per_client: int = 2,
    shard_rule: str = "random",
) -> Partition:
    """Each client holds samples of ``classes_per_client`` classes only.

    ``shard_rule="random"`` (NIID-Bench #C=k): client i takes class i mod C plus k-1 distinct random
    classes; each class is split evenly over the clients that hold it. Classes nobody drew stay unused
    (always some when num_clients*classes_per_client < classes), and a ``UserWarning`` says which.

    ``shard_rule="fedphd"`` (FedPhD's code): each class is cut into s = N*k/C shards and shard j of
    class i goes to client (s*i + j) mod N. Deterministic apart from the shuffle within a class.
    FedPhD drops the remainder of len(class)/s; here shard sizes differ by at most one instead.

    ``shard_rule="fedphd-proportional"`` (FedPhD's CelebA split, k = 1): each client holds one class;
    class c gets ceil(N * n_c / n) clients, the classes with the most clients giving one back (largest
    first) until N are assigned, and each class is split evenly over its clients.
    """
    classes = np.unique(labels)
    num_classes = len(classes)
    k = classes_per_client
    if not 1 <= k <= num_classes:
        raise PartitionError(f"classes_per_client must be in [1, {num_classes}], got {k}")
    _check(len(labels), num_clients)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    if shard_rule == "fedphd":
        shards = num_clients * k // num_classes
        if shards < 1:
            raise PartitionError(
                f"fedphd shard rule needs num_clients*classes_per_client >= classes "
                f"({num_clients}*{k} < {num_classes})"
            )
        for i, c in enumerate(classes):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            for j, chunk in enumerate(np.array_split(idx, shards)):
                parts[(shards * i + j) % num_clients].extend(chunk.tolist())
    elif shard_rule == "fedphd-proportional":
        if k != 1:
            raise PartitionError(f"shard_rule 'fedphd-proportional' gives each client one class; "
                                 f"classes_per_client must be 1, got {k}")
        if num_clients < num_classes:
            raise PartitionError(f"fedphd-proportional needs a client per class: {num_clients} clients < "
                                 f"{num_classes} classes")
        counts = np.array([np.sum(labels == c) for c in classes])
        per_class = proportional_clients(counts, num_clients)
        owner = 0
        for c, m in zip(classes, per_class):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            for chunk in np.array_split(idx, m):
                parts[owner].extend(chunk.tolist())
                owner += 1
    elif shard_rule == "random":
        held, unused = [], []
        for i in range(num_clients):
            mine = [i % num_classes]
            while len(mine) < k:
                c = int(rng.integers(num_classes))
                if c not in mine:
                    mine.append(c)
            held.append(mine)
        for ci, c in enumerate(classes):
            owners = [i for i in range(num_clients) if ci in held[i]]
            if not owners:
                unused.append(c)
                continue
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
                parts[owner].extend(chunk.tolist())
        if unused:
            dropped = int(np.isin(labels, unused).sum())
            warnings.warn(
                f"pathological(classes_per_client={k}, shard_rule='random') with {num_clients} clients "
                f"leaves {dropped} of {len(labels)} samples unused: no client drew classes "
                f"{[x.item() for x in unused]}; raise num_clients or classes_per_client to use all "
                f"{num_classes} classes",
                stacklevel=2,
            )
    else:
        raise PartitionError(f"unknown shard_rule {shard_rule!r}; choose from ['fedphd', 'fedphd-proportional', "
                             "'random']")
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise PartitionError(f"pathological partition left clients {empty} without data")
    return _finish(parts)


def proportional_clients(counts: np.ndarray, num_clients: int) -> list[int]:
    """Clients per class in proportion to class sizes: ceil(N n_c / n), then one back from the class with
    the most clients (the first such) until they sum to N; every class keeps at least one."""
    per = [max(1, int(np.ceil(num_clients * c / counts.sum()))) for c in counts]
    while sum(per) > num_clients:
        i = max(range(len(per)), key=lambda j: (per[j], -j))
        per[i] -= 1
    return per


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "pathological": pathological,
    "quantity": quantity,
}

# which config keys each partitioner takes
PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_samples"),
    "quantity": ("alpha", "min_samples"),
    "pathological": ("classes_per_client", "shard_rule"),
}


def make_partition(method: str, labels: np.ndarray, num_clients: int, seed: int, **params: Any) -> Partition:
    """Dispatch by name; parameters a method does not use are ignored."""
    if method not in PARTITIONERS:
        raise PartitionError(f"unknown partition method {method!r}; choose from {sorted(PARTITIONERS)}")
    kwargs = {k: params[k] for k in PARAMS[method] if k in params}
    return PARTITIONERS[method](np.asarray(labels), num_clients, seed, **kwargs)


def label_histograms(labels: np.ndarray, parts: Partition, num_classes: int) -> np.ndarray:
    """(num_clients, num_classes) counts of each label per client."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def partition_hash(parts: Partition) -> str:
    """A short content hash of a partition (order of clients and indices matters)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(np.int64(len(p)).tobytes())
        h.update(np.ascontiguousarray(p, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
