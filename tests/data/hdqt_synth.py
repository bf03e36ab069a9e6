"""Writers of small dataset files in the original public formats, for the data tests."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def write_cifar100(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """cifar-100-python/{train,test,meta} with random images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for part, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        record = {
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
            b"batch_label": f"{part} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": data,
        }
        (folder / part).write_bytes(pickle.dumps(record, protocol=2))
        written[part] = (data, np.array(fine))
    meta = {
        b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i:02d}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def pamap2_table(activity_runs: list[tuple[int, int]], seed: int = 0) -> np.ndarray:
    """A (rows, 54) PAMAP2 table: runs of (activity id, length), 100 Hz timestamps, random IMUs."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(length, act) for act, length in activity_runs])
    table = rng.normal(size=(len(labels), 54)).round(5)
    table[:, 0] = np.arange(len(labels)) / 100.0
    table[:, 1] = labels
    table[:, 2] = np.nan
    table[::11, 2] = 100.0  # heart rate, sparse as in the real files
    return table


def write_pamap2(path: Path, table: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [" ".join("NaN" if np.isnan(v) else repr(float(v)) for v in row) for row in table]
    path.write_text("\n".join(lines) + "\n")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzip-compressed if the name ends with .gz)."""
    magic = {1: 2049, 3: 2051}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def write_fashion_mnist(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written[prefix] = (images, labels)
    return written


def write_hapt(raw: Path, recordings: dict[tuple[int, int], int], segments: list[tuple], seed: int = 0) -> dict:
    """RawData/ with acc/gyro files of the given lengths per (experiment, user) and labels.txt
    rows (experiment, user, activity, start, end); returns {(exp, user): (acc, gyro)}."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    signals = {}
    for (exp, user), n in recordings.items():
        acc = rng.normal(size=(n, 3)).round(6)
        gyro = rng.normal(size=(n, 3)).round(6)
        np.savetxt(raw / f"acc_exp{exp:02d}_user{user:02d}.txt", acc, fmt="%.6f")
        np.savetxt(raw / f"gyro_exp{exp:02d}_user{user:02d}.txt", gyro, fmt="%.6f")
        signals[(exp, user)] = (acc, gyro)
    np.savetxt(raw / "labels.txt", np.array(segments, dtype=int), fmt="%d")
    return signals


def write_dsads_tree(data_dir: Path, seed: int = 0) -> dict:
    """Segment files for activities a01, a19, subject p8, segments s01, s60: a 4-file set that
    tests accept as complete by patching ``dsads._EXPECTED_FILES`` to 4."""
    rng = np.random.default_rng(seed)
    values = {}
    for a in (1, 19):
        for s in (1, 60):
            x = rng.normal(scale=30, size=(125, 45)).round(5)
            path = data_dir / f"a{a:02d}" / "p8" / f"s{s:02d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(path, x, delimiter=",", fmt="%.5f")
            values[(a, s)] = x
    return values


def write_dsads_npz(path: Path, seed: int = 0, **replace) -> dict:
    """A dsads.npz with the 4 segments of ``write_dsads_tree`` (a01, a19 x p8 x s01, s60): a set
    that tests accept as complete by patching ``dsads._EXPECTED_FILES`` to 4. ``replace``
    overrides arrays (None drops one), to write malformed copies."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.normal(scale=30, size=(4, 125, 45)).astype(np.float16),
        "y": np.array([0, 0, 18, 18], dtype=np.int16),
        "subject": np.full(4, 8, dtype=np.int16),
        "segment": np.array([1, 60, 1, 60], dtype=np.int16),
    }
    arrays.update(replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez(path) would append .npz to a name without it
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})
    return arrays
