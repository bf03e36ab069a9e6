"""A malformed copy in an earlier root is skipped and reported, and a good copy in a later root
is used: for every dataset and layout, the probe checks names, headers and shapes cheaply."""
from __future__ import annotations

import dataclasses
import pickle
import re
import shutil

import numpy as np
import pytest
from hdqt_synth import (
    pamap2_table,
    write_cifar100,
    write_dsads_npz,
    write_dsads_tree,
    write_fashion_mnist,
    write_hapt,
    write_pamap2,
)

from hdqt import data
from hdqt.cli import main as hdqt_main
from hdqt.data import DatasetFormatError
from hdqt.data import dsads as dsads_module


def _hdqt_data(capsys) -> str:
    assert hdqt_main(["data"]) == 0
    return capsys.readouterr().out


def _rewrite(path, edit):
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


# --- the copies: a writer of a good copy (returns its number of rows) and spoilers ----------

def _dsads_good(root):
    write_dsads_npz(root / "dsads" / "dsads.npz")
    return 4


def _dsads_text(root):
    write_dsads_tree(root / "dsads" / "data")
    return root / "dsads" / "data"


def _truncated_npz(root):
    path = root / "dsads" / "dsads.npz"
    write_dsads_npz(path)
    path.write_bytes(path.read_bytes()[:3000])


def _hapt_good(root):
    write_hapt(root / "hapt" / "RawData", {(1, 1): 300}, [(1, 1, 1, 1, 256)])
    return 3  # windows at 0, 64, 128


def _hapt_bad(root):
    raw = root / "hapt" / "RawData"
    write_hapt(raw, {(1, 1): 300}, [(1, 1, 1, 1, 256), (1, 1, 2, 257, 300)])
    return raw


def _pamap2_good(root, subjects=(101, 102)):
    for subject in subjects:
        write_pamap2(root / "pamap2" / "Protocol" / f"subject{subject}.dat", pamap2_table([(4, 120)], seed=subject))
    return len(subjects)  # one 100-sample window each


def _cifar_good(root, n_train=4):
    write_cifar100(root / "cifar-100-python", n_train=n_train, n_test=2)
    return n_train + 2


def _fmnist_good(root, n_train=5):
    write_fashion_mnist(root / "fashion-mnist", n_train=n_train, n_test=2)
    return n_train + 2


def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


CASES = {
    # DSADS, dsads.npz
    "dsads-npz-missing-array": (
        "dsads", _dsads_good,
        lambda r: write_dsads_npz(r / "dsads" / "dsads.npz", subject=None),
        r"dsads\.npz: missing array 'subject'; expected arrays x, y, subject, segment \(found x, y, segment\)"),
    "dsads-npz-not-a-zip": (
        "dsads", _dsads_good,
        lambda r: (r / "dsads").mkdir(parents=True) or (r / "dsads" / "dsads.npz").write_bytes(b"garbage" * 100),
        r"dsads\.npz: not a readable npz archive"),
    "dsads-npz-truncated": ("dsads", _dsads_good, _truncated_npz, r"dsads\.npz: not a readable npz archive"),
    "dsads-npz-x-shape": (
        "dsads", _dsads_good,
        lambda r: write_dsads_npz(r / "dsads" / "dsads.npz", x=np.zeros((4, 125, 3), np.float16)),
        r"dsads\.npz: array 'x' has shape \(4, 125, 3\), expected \(N, 125, 45\)"),
    "dsads-npz-x-object": (
        "dsads", _dsads_good,
        lambda r: write_dsads_npz(r / "dsads" / "dsads.npz", x=np.empty((4, 125, 45), object)),
        r"dsads\.npz: array 'x' has dtype object, expected floating point"),
    "dsads-npz-y-float": (
        "dsads", _dsads_good,
        lambda r: write_dsads_npz(r / "dsads" / "dsads.npz", y=np.array([0.0, 0.0, 18.0, 18.0])),
        r"dsads\.npz: array 'y' has dtype float64, expected integers"),
    "dsads-npz-y-length": (
        "dsads", _dsads_good,
        lambda r: write_dsads_npz(r / "dsads" / "dsads.npz", y=np.zeros(3, np.int16)),
        r"dsads\.npz: array 'y' has shape \(3,\), expected \(4,\) \(one value per row of x\)"),
    "dsads-npz-y-range": (
        "dsads", _dsads_good,
        lambda r: write_dsads_npz(r / "dsads" / "dsads.npz", y=np.array([0, 0, 18, 19], np.int16)),
        r"dsads\.npz: array 'y' holds 19, outside 0\.\.18"),
    "dsads-npz-segment-twice": (
        "dsads", _dsads_good,
        lambda r: write_dsads_npz(r / "dsads" / "dsads.npz", segment=np.array([1, 1, 1, 60], np.int16)),
        r"dsads\.npz: segment a01/p8/s01 appears in rows 0 and 1"),
    # DSADS, UCI text tree
    "dsads-text-empty-file": (
        "dsads", _dsads_good,
        lambda r: (_dsads_text(r) / "a19" / "p8" / "s60.txt").write_text(""),
        r"a19/p8/s60\.txt, line 1: the file holds no data rows"),
    "dsads-text-invalid-id": (
        "dsads", _dsads_good,
        lambda r: shutil.copytree(_dsads_text(r) / "a01", r / "dsads" / "data" / "a20"),
        r"a20/p8/s01\.txt: activity 20 in the file name is outside 1\.\.19"),
    "dsads-text-columns": (
        "dsads", _dsads_good,
        lambda r: _rewrite(_dsads_text(r) / "a01" / "p8" / "s01.txt",
                           lambda lines: lines.__setitem__(0, lines[0].replace(",", ";"))),
        r"a01/p8/s01\.txt, line 1: expected 45 ','-separated numbers, found 1"),
    # HAPT
    "hapt-labels-not-a-number": (
        "hapt", _hapt_good,
        lambda r: _rewrite(_hapt_bad(r) / "labels.txt", lambda lines: lines.__setitem__(1, "1 1 x 257 300")),
        r"labels\.txt, line 2: 'x' is not a number"),
    "hapt-labels-activity": (
        "hapt", _hapt_good,
        lambda r: _rewrite(_hapt_bad(r) / "labels.txt", lambda lines: lines.__setitem__(1, "1 1 13 257 300")),
        r"labels\.txt, line 2: activity 13 must be 1\.\.12 and 1 <= start <= end, got start 257, end 300"),
    "hapt-signal-columns": (
        "hapt", _hapt_good,
        lambda r: _rewrite(_hapt_bad(r) / "acc_exp01_user01.txt", lambda lines: lines.__setitem__(0, "0.1 0.2")),
        r"acc_exp01_user01\.txt, line 1: expected 3 whitespace-separated numbers, found 2"),
    "hapt-signal-empty": (
        "hapt", _hapt_good,
        lambda r: (_hapt_bad(r) / "gyro_exp01_user01.txt").write_text(""),
        r"gyro_exp01_user01\.txt, line 1: the file holds no data rows"),
    # PAMAP2
    "pamap2-columns": (
        "pamap2", _pamap2_good,
        lambda r: _rewrite(r / "pamap2" / "Protocol" / "subject103.dat",
                           lambda lines: lines.__setitem__(0, lines[0].rsplit(" ", 1)[0]))
        if _pamap2_good(r, (101, 102, 103)) else None,
        r"subject103\.dat, line 1: expected 54 whitespace-separated numbers, found 53"),
    "pamap2-empty": (
        "pamap2", _pamap2_good,
        lambda r: (r / "pamap2" / "Protocol" / "subject109.dat").write_text("\n")
        if _pamap2_good(r, (101, 109)) else None,
        r"subject109\.dat, line 1: the file holds no data rows"),
    # CIFAR-100
    "cifar100-train-garbage": (
        "cifar100", _cifar_good,
        lambda r: _cifar_good(r, 3) and (r / "cifar-100-python" / "train").write_bytes(b"not a pickle"),
        r"cifar-100-python/train: truncated or corrupted pickle"),
    "cifar100-test-truncated": (
        "cifar100", _cifar_good,
        lambda r: _cifar_good(r, 3) and _cut(r / "cifar-100-python" / "test", 5000),
        r"cifar-100-python/test: truncated or corrupted pickle"),
    "cifar100-meta-empty": (
        "cifar100", _cifar_good,
        lambda r: _cifar_good(r, 3) and _cut(r / "cifar-100-python" / "meta", 0),
        r"cifar-100-python/meta: truncated or corrupted pickle"),
    "cifar100-meta-99-names": (
        "cifar100", _cifar_good,
        lambda r: _cifar_good(r, 3) and _repickle(r / "cifar-100-python" / "meta",
                                                  lambda meta: meta[b"fine_label_names"].pop()),
        r"cifar-100-python/meta: b'fine_label_names' must be a list of 100 strings"),
    # Fashion-MNIST
    "fashion_mnist-truncated-gz": (
        "fashion_mnist", _fmnist_good,
        lambda r: _fmnist_good(r, 4) and _cut(r / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 200),
        r"t10k-images-idx3-ubyte\.gz: truncated or corrupted gzip file"),
    "fashion_mnist-magic": (
        "fashion_mnist", _fmnist_good,
        lambda r: _fmnist_good(r, 4) and shutil.copy(r / "fashion-mnist" / "train-labels-idx1-ubyte.gz",
                                                     r / "fashion-mnist" / "train-images-idx3-ubyte.gz"),
        r"train-images-idx3-ubyte\.gz: IDX magic number 2049, expected 2051"),
    "fashion_mnist-counts": (
        "fashion_mnist", _fmnist_good,
        lambda r: write_fashion_mnist(r / "fashion-mnist", n_train=4, n_test=2)
        and write_fashion_mnist(r / "other", n_train=3, n_test=2)
        and shutil.copy(r / "other" / "train-labels-idx1-ubyte.gz", r / "fashion-mnist"),
        r"train-labels-idx1-ubyte\.gz: 3 labels for 4 images in .*train-images-idx3-ubyte\.gz"),
    "fashion_mnist-raw-size": (
        "fashion_mnist", _fmnist_good,
        lambda r: write_fashion_mnist(r / "fashion-mnist", n_train=4, n_test=2) and _raw_and_cut(r),
        r"t10k-labels-idx1-ubyte: the header announces \(2,\) = 2 bytes of data, the file holds 1 \(truncated\?\)"),
}


def _repickle(path, change):
    record = pickle.loads(path.read_bytes())
    change(record)
    path.write_bytes(pickle.dumps(record, protocol=2))
    return True


def _raw_and_cut(root):
    import gzip

    folder = root / "fashion-mnist"
    packed = folder / "t10k-labels-idx1-ubyte.gz"
    (folder / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(packed.read_bytes())[:-1])
    packed.unlink()
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_copy_in_an_earlier_root_is_skipped_and_reported(case, tmp_path, monkeypatch, capsys):
    name, write_good, spoil, reason = CASES[case]
    monkeypatch.setattr(dsads_module, "_EXPECTED_FILES", 4)  # the 4-segment DSADS copies are complete
    kwargs = {"window": 100, "step": 100} if name == "pamap2" else {}
    bad, good = tmp_path / "bad", tmp_path / "good"
    rows = write_good(good)
    spoil(bad)
    # alone, the bad copy is an error naming the file (and line) to fix
    with pytest.raises(DatasetFormatError, match=reason):
        data.load(name, root=bad, features=False, **kwargs)
    # before a good copy, it is skipped
    monkeypatch.setenv("HDQT_DATA", f"{bad}:{good}")
    assert len(data.load(name, features=False, **kwargs)) == rows
    section = _hdqt_data(capsys).split(f"\n{name}: ", 1)[1].split("\n\n")[0]
    assert section.startswith(f"found in {good}"), section
    assert re.search(rf"\n  {re.escape(str(bad))}\S*: malformed, skipped: .*{reason}", section), section


def test_npz_missing_array_error_names_the_array_the_file_and_what_is_expected(tmp_path):
    write_dsads_npz(tmp_path / "dsads" / "dsads.npz", segment=None, subject=None)
    with pytest.raises(DatasetFormatError) as info:
        data.load("dsads", root=tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'dsads' / 'dsads.npz'}: missing arrays 'subject', 'segment'; "
        "expected arrays x, y, subject, segment (found x, y)"
    )


def test_a_dsads_npz_lacking_segments_is_partial_and_a_complete_copy_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dsads_module, "_EXPECTED_FILES", 4)
    write_dsads_npz(tmp_path / "a" / "dsads" / "dsads.npz", x=np.zeros((3, 125, 45), np.float16),
                    y=np.array([0, 0, 18], np.int16), subject=np.full(3, 8, np.int16),
                    segment=np.array([1, 60, 1], np.int16))
    part = data.load("dsads", root=tmp_path / "a", features=False)
    assert len(part) == 3 and "Partial copy: 3 of the 4 segments" in part.description
    write_dsads_npz(tmp_path / "b" / "dsads" / "dsads.npz")
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert len(data.load("dsads", features=False)) == 4
    out = _hdqt_data(capsys)
    assert f"dsads: found in {tmp_path / 'b' / 'dsads'} (npz)" in out
    assert f"{tmp_path / 'a' / 'dsads'}: found (npz), partial: 3 of the 4 segments" in out


def test_a_non_finite_dsads_npz_signal_is_rejected_when_loaded(tmp_path):
    x = np.zeros((4, 125, 45), np.float16)
    x[2, 7, 3] = np.inf
    write_dsads_npz(tmp_path / "dsads" / "dsads.npz", x=x)
    with pytest.raises(DatasetFormatError, match=r"dsads\.npz: array 'x' holds inf at row 2, sample 7, channel 3"):
        data.load("dsads", root=tmp_path)


def test_a_copy_that_cannot_be_read_is_skipped_as_malformed(tmp_path, monkeypatch, capsys):
    from hdqt.data import fashion_mnist as fmnist_module

    write_fashion_mnist(tmp_path / "bad" / "fashion-mnist", n_train=4, n_test=2)
    write_fashion_mnist(tmp_path / "good" / "fashion-mnist", n_train=5, n_test=2)
    unreadable = tmp_path / "bad" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    probe = fmnist_module.SOURCE.probe

    def denied(folder):  # as for a file without read permission (chmod does not bind root)
        if folder == unreadable.parent:
            raise PermissionError(13, "Permission denied", str(unreadable))
        return probe(folder)

    monkeypatch.setattr(fmnist_module, "SOURCE", dataclasses.replace(fmnist_module.SOURCE, probe=denied))
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path / 'bad'}:{tmp_path / 'good'}")
    assert len(data.load("fashion_mnist")) == 7
    out = _hdqt_data(capsys)
    assert f"{unreadable.parent}: malformed, skipped: {unreadable}: cannot read it (Permission denied)" in out
    with pytest.raises(DatasetFormatError, match=r"train-images-idx3-ubyte\.gz: cannot read it"):
        data.load("fashion_mnist", root=tmp_path / "bad")


def _tar(source, archive):
    import tarfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname=source.name)


@pytest.mark.parametrize("name", ["hapt", "cifar100"])
def test_an_archive_with_a_malformed_member_is_skipped_and_reported(name, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    if name == "hapt":
        _rewrite(_hapt_bad(src) / "gyro_exp01_user01.txt", lambda lines: lines.__setitem__(0, "1 2 3 4"))
        bad_archive = tmp_path / "bad" / "hapt" / "hapt.tar.gz"
        _tar(src / "hapt" / "RawData", bad_archive)
        reason = r"hapt\.tar\.gz:RawData/gyro_exp01_user01\.txt, line 1: expected 3 whitespace-separated"
        rows = _hapt_good(tmp_path / "good")
    else:
        _cifar_good(src, 3)
        _repickle(src / "cifar-100-python" / "meta", lambda meta: meta.pop(b"fine_label_names"))
        bad_archive = tmp_path / "bad" / "cifar-100-python.tar.gz"
        _tar(src / "cifar-100-python", bad_archive)
        reason = r"cifar-100-python\.tar\.gz:cifar-100-python/meta: missing key b'fine_label_names'"
        rows = _cifar_good(tmp_path / "good")
    # an archive that cannot be used is reported as such, and the search goes on (docs/data.md)
    with pytest.raises(data.DatasetNotFoundError, match=reason):
        data.load(name, root=tmp_path / "bad")
    monkeypatch.setenv("HDQT_DATA", f"{tmp_path / 'bad'}:{tmp_path / 'good'}")
    assert len(data.load(name, features=False)) == rows
    section = _hdqt_data(capsys).split(f"\n{name}: ", 1)[1].split("\n\n")[0]
    assert section.startswith(f"found in {tmp_path / 'good'}"), section
    assert re.search(rf"\n  {re.escape(str(bad_archive.parent))}: malformed, skipped: .*{reason}", section), section
