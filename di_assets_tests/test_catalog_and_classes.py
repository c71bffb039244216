import dagster as dg
import pytest

from di_assets.ml.classes import class_key, discover_classes
from di_assets.ml.io import atomic_path, hash_folder
from di_assets.ml.shifts import IMAGENET_STAR, TOKEN, select_shifts

IMAGENET_STAR_KEYS = [
    "in_the_grass", "in_the_beach", "in_the_forest", "in_the_water", "on_the_road", "on_the_rocks", "in_the_snow",
    "in_the_rain", "in_the_fog", "and_a_flower", "pencil_sketch", "in_bright_sunlight", "at_night", "at_dusk",
    "studio_lighting", "blue", "green", "red", "yellow", "orange", "person_and_a", "oil_painting", "embroidery",
]


def test_catalog_is_base_plus_the_23_imagenet_star_shifts():
    assert [s.key for s in IMAGENET_STAR] == ["base"] + IMAGENET_STAR_KEYS
    assert all(TOKEN in s.prompt and s.caption and TOKEN not in s.caption for s in IMAGENET_STAR)


def test_catalog_can_be_replaced(tmp_path):
    f = tmp_path / "shifts.yaml"
    f.write_text("- base\n- key: on_mars\n  prompt: a photo of a <TOKEN> on mars\n  caption: a photo on mars\n")
    assert [s.key for s in select_shifts(str(f))] == ["base", "on_mars"]
    with pytest.raises(ValueError, match="no <TOKEN> placeholder"):
        select_shifts([{"key": "x", "prompt": "a photo of a dog", "caption": "c"}])
    with pytest.raises(ValueError, match="unknown shift 'on_venus'"):
        select_shifts(["on_venus"])
    with pytest.raises(ValueError, match="is not a valid key"):
        select_shifts([{"key": "a|b", "prompt": "<TOKEN>", "caption": "c"}])


@pytest.mark.parametrize("name", ["hot dog, frank", "a|b", "[weird] name", "Dobermann"])
def test_odd_class_names_give_valid_partition_keys(tmp_path, name):
    (tmp_path / name).mkdir()
    (c,) = discover_classes(tmp_path)
    assert c.path.name == name and c.name == " ".join(name.replace("_", " ").split())
    key = dg.MultiPartitionKey({"class": c.key, "shift": "base"})
    assert key.keys_by_dimension["class"] == c.key
    dg.DynamicPartitionsDefinition(name="x").build_add_request([c.key])  # accepted by Dagster
    assert not set("|[], ") & set(c.key)


def test_colliding_class_keys_are_an_error(tmp_path):
    (tmp_path / "hot dog").mkdir()
    (tmp_path / "hot_dog").mkdir()
    with pytest.raises(ValueError, match="both map to key 'hot_dog'"):
        discover_classes(tmp_path)
    with pytest.raises(ValueError, match="empty key"):
        class_key("|||")


def test_the_class_folders_are_listed_again_only_when_the_dataset_folder_changed(tmp_path, monkeypatch):
    """An update asks for the classes in each step: the folder is listed once while it stays as it was,
    and again as soon as a class folder comes, goes or is renamed (its mtime), never from a racy listing."""
    import os
    import time

    from di_assets.ml import classes
    from di_assets.ml.observe import RACY_NS

    data = tmp_path / "data"
    for name in ("circle", "square"):
        (data / name).mkdir(parents=True)
    listed = []
    real = os.scandir
    monkeypatch.setattr(classes.os, "scandir", lambda path: listed.append(path) or real(path))

    def keys():
        return [c.key for c in discover_classes(data)]

    assert keys() == keys() == ["circle", "square"] and len(listed) == 2  # just made: racy, not kept
    time.sleep(2 * RACY_NS / 1e9)
    assert keys() == keys() == keys() == ["circle", "square"] and len(listed) == 3  # kept, then reused
    (data / "star").mkdir()
    assert keys() == ["circle", "square", "star"]
    time.sleep(2 * RACY_NS / 1e9)
    keys()
    (data / "square").rename(data / "triangle")
    assert keys() == ["circle", "star", "triangle"]
    (data / "circle").rmdir()
    assert keys() == ["star", "triangle"]
    # a link's target can come or go while the dataset folder stays as it is: such a listing is not kept
    (tmp_path / "elsewhere").mkdir()
    (data / "linked").symlink_to(tmp_path / "elsewhere")
    time.sleep(2 * RACY_NS / 1e9)
    assert keys() == ["linked", "star", "triangle"]
    (tmp_path / "elsewhere").rmdir()
    assert keys() == ["star", "triangle"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_classes(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder of class folders"):
        discover_classes(tmp_path / "file")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_folder_hash_follows_content(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.png").write_bytes(b"x")
    h = hash_folder(tmp_path / "c")
    (tmp_path / "c" / ".DS_Store").write_bytes(b"junk")
    assert hash_folder(tmp_path / "c") == h
    (tmp_path / "c" / "1.png").write_bytes(b"y")
    assert hash_folder(tmp_path / "c") != h


def test_describe_folder_counts_images_and_names_skipped_files(tmp_path):
    import shutil

    from di_assets.ml.io import describe_folder, hash_folder
    from di_assets_tests.conftest import EXAMPLE

    for f in sorted((EXAMPLE / "star").iterdir())[:3]:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    d = describe_folder(tmp_path)
    assert d["images"] == 3 and sorted(d["skipped"]) == ["broken.png", "notes.txt"]
    assert d["hash"] == hash_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("changed")
    assert describe_folder(tmp_path)["hash"] != d["hash"]
