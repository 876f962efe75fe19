from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.data.datalist import discover, find_items, load_datalist, stratified_split, write_split
from app.errors import DataError


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"study_{i:04d}.nii.gz").write_bytes(b"x")
    return root


def test_discover_maps_mosmed_classes(tmp_path):
    make_tree(tmp_path, {"CT-0": 3, "CT-1": 1, "CT-23": 2, "notes": 0})
    items = discover(tmp_path)
    assert [Path(str(d["image"])).parent.name for d in items] == ["CT-0"] * 3 + ["CT-1"] + [
        "CT-23"
    ] * 2
    assert [d["label"] for d in items] == [0, 0, 0, 1, 1, 1]
    assert discover(tmp_path) == items  # deterministic


def test_discover_finds_download_layout_and_custom_map(tmp_path):
    make_tree(tmp_path / "MosMedData", {"CT-0": 1, "CT-23": 1})
    assert len(discover(tmp_path)) == 2
    items = discover(tmp_path / "MosMedData", class_map={"CT-0": 1, "CT-23": 0})
    assert [d["label"] for d in items] == [1, 0]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param(lambda p: p / "absent", "does not exist", id="missing-root"),
        pytest.param(
            lambda p: make_tree(p, {"other": 1}), "holds none of the class folders", id="no-class"
        ),
        pytest.param(
            lambda p: make_tree(p, {"CT-0": 2, "CT-23": 0}), "holds no .nii", id="empty-class"
        ),
    ],
)
def test_discover_errors(tmp_path, setup, message):
    root = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        discover(root)


def test_datalists_csv_and_json(tmp_path):
    make_tree(tmp_path, {"CT-0": 1, "CT-23": 1})
    (tmp_path / "list.csv").write_text(
        "image,label\nCT-23/study_0000.nii.gz,1\nCT-0/study_0000.nii.gz,0\n"
    )
    csv_items = load_datalist(tmp_path / "list.csv")
    assert [d["label"] for d in csv_items] == [0, 1]
    assert all(Path(str(d["image"])).is_absolute() for d in csv_items)
    (tmp_path / "list.json").write_text(
        json.dumps(
            {
                "training": [{"image": "CT-0/study_0000.nii.gz", "label": 0}],
                "validation": [{"image": "CT-23/study_0000.nii.gz", "label": 1}],
            }
        )
    )
    assert find_items(tmp_path / "list.json") == csv_items


def test_datalist_naming_missing_files(tmp_path):
    (tmp_path / "list.csv").write_text("image,label\nnope.nii.gz,1\n")
    with pytest.raises(DataError, match="do not exist: .*nope.nii.gz"):
        load_datalist(tmp_path / "list.csv")
    (tmp_path / "bad.csv").write_text("path,y\na,1\n")
    with pytest.raises(DataError, match="'image' and 'label'"):
        load_datalist(tmp_path / "bad.csv")


def test_split_is_stratified_seeded_and_reference_sized(tmp_path):
    items = [{"image": f"/d/{c}/{i:03d}.nii.gz", "label": c} for c in (0, 1) for i in range(100)]
    train, val = stratified_split(items, train_fraction=0.7, seed=1)
    assert sum(d["label"] == 0 for d in train) == 70 and sum(d["label"] == 1 for d in train) == 70
    assert len(val) == 60 and not {d["image"] for d in train} & {d["image"] for d in val}
    assert stratified_split(items, train_fraction=0.7, seed=1) == (train, val)
    assert stratified_split(items, train_fraction=0.7, seed=2)[0] != train
    write_split(tmp_path / "split.json", train, val)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["training"] == train and saved["validation"] == val


def test_split_keeps_each_side_non_empty():
    items = [{"image": f"{c}{i}", "label": c} for c in (0, 1) for i in range(2)]
    train, val = stratified_split(items, train_fraction=0.9, seed=0)
    assert len(train) == 2 and len(val) == 2


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param(
            {"image": {"_target_": "os.system"}, "label": 0}, "must be a file path", id="image-dict"
        ),
        pytest.param({"image": ["a.nii.gz"], "label": 0}, "must be a file path", id="image-list"),
        pytest.param({"image": 12, "label": 0}, "must be a file path", id="image-number"),
        pytest.param({"image": "a.nii.gz", "label": True}, "is not 0 or 1", id="label-bool"),
        pytest.param({"image": "a.nii.gz", "label": 1.5}, "is not 0 or 1", id="label-float"),
        pytest.param({"image": "a.nii.gz", "label": [1]}, "is not 0 or 1", id="label-list"),
        pytest.param({"image": "a.nii.gz", "label": "$1"}, "is not 0 or 1", id="label-expression"),
        pytest.param("a.nii.gz", "needs the fields", id="entry-string"),
    ],
)
def test_datalist_values_of_the_wrong_type_are_refused(tmp_path, entry, message):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    with pytest.raises(DataError, match=message):
        load_datalist(tmp_path / "list.json")


def test_datalist_text_is_never_evaluated(tmp_path, capsys):
    from app.train import main as train_main

    marker = tmp_path / "pwned"
    code = f"$__import__('pathlib').Path({str(marker)!r}).touch()"
    (tmp_path / "list.json").write_text(json.dumps([{"image": code, "label": 1}] * 2))
    args = [
        "--data",
        str(tmp_path / "list.json"),
        "--output",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert train_main(args) == 2
    assert "do not exist" in capsys.readouterr().err and not marker.exists()


def test_datalist_that_is_not_a_list_or_too_large_is_refused(tmp_path, monkeypatch):
    from app.data import datalist

    (tmp_path / "list.json").write_text(json.dumps({"training": "everything"}))
    with pytest.raises(DataError, match="is empty"):
        load_datalist(tmp_path / "list.json")
    (tmp_path / "scalar.json").write_text("7")
    with pytest.raises(DataError, match="expected a list"):
        load_datalist(tmp_path / "scalar.json")
    monkeypatch.setattr(datalist, "MAX_DATALIST_BYTES", 10)
    with pytest.raises(DataError, match="not a datalist"):
        load_datalist(tmp_path / "list.json")


@pytest.mark.parametrize(
    "second, label, message",
    [
        pytest.param("a.nii.gz", 0, "the same file twice", id="same-path"),
        pytest.param("./a.nii.gz", 0, "the same file twice", id="dot-slash"),
        pytest.param("sub/../a.nii.gz", 0, "the same file twice", id="dot-dot"),
        pytest.param("link.nii.gz", 0, "the same file twice", id="symlink"),
        pytest.param("a.nii.gz", 1, "the same file in two classes", id="two-classes"),
    ],
)
def test_a_file_named_twice_is_refused_with_both_entries(tmp_path, second, label, message):
    (tmp_path / "sub").mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    rows = [
        {"image": "a.nii.gz", "label": 0},
        {"image": "b.nii.gz", "label": 1},
        {"image": "c.nii.gz", "label": 1},
        {"image": second, "label": label},
    ]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=f"entry 1 and entry 4 are {message}"):
        load_datalist(tmp_path / "list.json")
    rows[3] = {"image": "c.nii.gz", "label": 1}
    rows[2] = {"image": "b.nii.gz", "label": 1}
    (tmp_path / "list.json").write_text(json.dumps(rows[:2]))
    assert len(load_datalist(tmp_path / "list.json")) == 2


def test_a_scan_linked_into_two_class_folders_is_refused(tmp_path):
    make_tree(tmp_path, {"CT-0": 2, "CT-23": 2})
    (tmp_path / "CT-23" / "copy.nii.gz").symlink_to(tmp_path / "CT-0" / "study_0000.nii.gz")
    with pytest.raises(DataError, match="the same file in two classes") as exc:
        discover(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path}: {tmp_path / 'CT-0' / 'study_0000.nii.gz'} and ")
    assert str(tmp_path / "CT-23" / "copy.nii.gz") in str(exc.value)


def _write_list(tmp_path, rows, name="list.json"):
    (tmp_path / name).write_text(json.dumps(rows))
    return tmp_path / name


@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param({"image": "c.nii.gz"}, "entry 3: needs the fields 'image' and 'label'", id="no-label"),
        pytest.param({"label": 1}, "entry 3: needs the fields 'image' and 'label'", id="no-image"),
        pytest.param({"image": "x" * 4097, "label": 1}, "entry 3: image must be a file path", id="too-long"),
        pytest.param({"image": "c\0.nii.gz", "label": 1}, "entry 3: image must be a file path", id="nul"),
        pytest.param({"image": "", "label": 1}, "entry 3: image must be a file path", id="empty"),
        pytest.param({"image": "c.nii.gz", "label": 2}, "entry 3: label 2 is not 0 or 1", id="label-2"),
        pytest.param({"image": "c.nii.gz", "label": "yes"}, "entry 3: label 'yes' is not 0 or 1", id="label-text"),
    ],
)  # fmt: skip
def test_datalist_errors_name_the_entry_by_its_number(tmp_path, bad, message):
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    rows = [{"image": "a.nii.gz", "label": 0}, {"image": "b.nii.gz", "label": 1}, bad]
    with pytest.raises(DataError, match=message):
        load_datalist(_write_list(tmp_path, rows))


def test_datalist_paths_labels_order_and_missing_files(tmp_path):
    """Relative paths are the datalist's folder's, absolute ones stay; '1' reads as 1; entries
    come back sorted by path; missing files are named, three and a count."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "z.nii.gz").write_bytes(b"x")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.nii.gz").write_bytes(b"x")
    rows = [{"image": str(elsewhere / "z.nii.gz"), "label": "1"}, {"image": "a.nii.gz", "label": 0}]
    items = load_datalist(_write_list(tmp_path / "lists", rows))
    assert items == [
        {"image": str(elsewhere / "z.nii.gz"), "label": 1},
        {"image": str(tmp_path / "lists" / "a.nii.gz"), "label": 0},
    ]
    missing = [{"image": f"m{i}.nii.gz", "label": 0} for i in range(5)]
    with pytest.raises(DataError, match=r"m0.nii.gz, .*m1.nii.gz, .*m2.nii.gz \(and 2 more\)$"):
        load_datalist(_write_list(tmp_path, missing))
    with pytest.raises(DataError, match=r"m2.nii.gz$"):
        load_datalist(_write_list(tmp_path, missing[:3]))


def test_datalist_size_limit_is_inclusive(tmp_path, monkeypatch):
    import app.data.datalist as datalist

    (tmp_path / "a.nii.gz").write_bytes(b"x")
    path = _write_list(tmp_path, [{"image": "a.nii.gz", "label": 0}])
    monkeypatch.setattr(datalist, "MAX_DATALIST_BYTES", path.stat().st_size)
    assert len(load_datalist(path)) == 1
    monkeypatch.setattr(datalist, "MAX_DATALIST_BYTES", path.stat().st_size - 1)
    with pytest.raises(DataError, match="not a datalist"):
        load_datalist(path)


def test_find_items_takes_a_folder_or_a_datalist_and_its_class_map(tmp_path):
    make_tree(tmp_path / "root", {"CT-0": 2, "CT-23": 1, "sick": 1})
    assert len(find_items(tmp_path / "root")) == 3
    custom = find_items(tmp_path / "root", class_map={"CT-0": 0, "sick": 1})
    assert [Path(str(i["image"])).parent.name for i in custom] == ["CT-0", "CT-0", "sick"]
    path = _write_list(tmp_path, [{"image": "root/sick/study_0000.nii.gz", "label": 1}])
    assert find_items(path) == [
        {"image": str(tmp_path / "root/sick/study_0000.nii.gz"), "label": 1}
    ]


def test_class_folders_at_the_root_win_over_a_mosmeddata_folder(tmp_path):
    make_tree(tmp_path, {"CT-0": 1, "CT-23": 1, "MosMedData/CT-0": 3, "MosMedData/CT-23": 3})
    assert len(discover(tmp_path)) == 2
    assert len(discover(tmp_path / "MosMedData")) == 6


def test_stratified_split_keeps_each_class_share_and_one_on_each_side():
    items = [{"image": f"n{i:02d}", "label": 0} for i in range(10)]
    items += [{"image": f"a{i:02d}", "label": 1} for i in range(4)]
    train, val = stratified_split(items, train_fraction=0.7, seed=3)
    assert [d["label"] for d in train].count(0) == 7 and [d["label"] for d in train].count(1) == 3
    assert [d["label"] for d in val].count(0) == 3 and [d["label"] for d in val].count(1) == 1
    pair = [{"image": "x", "label": 0}, {"image": "y", "label": 0}]
    pair += [{"image": "z", "label": 1}, {"image": "w", "label": 1}]
    train, val = stratified_split(pair, train_fraction=0.1, seed=0)
    assert len(train) == len(val) == 2  # a class of two gives one to each side
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\)"):
            stratified_split(items, train_fraction=fraction, seed=0)


def test_write_split_records_how_the_split_was_made(tmp_path):
    record = {"seed": 1, "folds": 0, "fold": 0, "train_fraction": 0.7, "dataset_dir": "d"}
    write_split(tmp_path / "s.json", [{"image": "a", "label": 0}], [], record)
    assert json.loads((tmp_path / "s.json").read_text())["record"] == record
    write_split(tmp_path / "t.json", [], [])
    assert "record" not in json.loads((tmp_path / "t.json").read_text())
