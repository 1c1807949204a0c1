"""Storage: the same calls on a local folder and on object storage (a real S3 API from moto, on 127.0.0.1)."""
import os

import pytest

from pipeline.storage import Storage, check_location


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    make_uri, _ = request.getfixturevalue("s3_server")
    return Storage(make_uri(f"{request.node.originalname}/run"))


def test_text_files_round_trip_and_list(storage):
    assert not storage.exists("a/b.txt") and storage.listdir("a") == []
    storage.write_text("a/b.txt", "one")
    storage.write_text("a/b.txt", "two")  # replaced whole
    storage.write_text("a/c.txt", "three")
    assert storage.read_text("a/b.txt") == "two"
    assert storage.listdir("a") == ["b.txt", "c.txt"]  # no temporary names left behind


def test_folders_written_and_read_through_a_local_directory(storage, tmp_path):
    with storage.writable_dir("ckpt/step_1") as folder:
        os.makedirs(os.path.join(folder, "shard"))
        with open(os.path.join(folder, "shard", "rank0.bin"), "wb") as fh:
            fh.write(b"\x00\x01")
    assert storage.listdir("ckpt/step_1") == ["shard"]
    with storage.readable_dir("ckpt/step_1") as folder:
        with open(os.path.join(folder, "shard", "rank0.bin"), "rb") as fh:
            assert fh.read() == b"\x00\x01"


def test_a_subfolder_opens_as_its_own_storage_and_a_folder_deletes(storage):
    storage.write_text("final/model.yaml", "kind: sentence")
    assert Storage(storage.location_of("final")).read_text("model.yaml") == "kind: sentence"  # the query is kept
    storage.delete_dir("final")
    storage.delete_dir("final")  # already gone: nothing happens
    assert not storage.exists("final/model.yaml") and storage.listdir("") == []


def test_a_failed_block_uploads_nothing(s3_server):
    make_uri, _ = s3_server
    storage = Storage(make_uri("failed/run"))
    with pytest.raises(RuntimeError):
        with storage.writable_dir("ckpt") as folder:
            open(os.path.join(folder, "half"), "w").close()
            raise RuntimeError("rank died")
    assert not storage.exists("ckpt/half")


def test_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("runs/x").location == str(tmp_path / "runs" / "x")


def test_relative_path_refused_on_a_cluster():
    check_location("runs/x", "--storage", cluster=False)  # local mode: the working directory is the user's
    check_location("/shared/runs/x", "--storage", cluster=True)
    check_location("s3://bucket/runs/x", "--storage", cluster=True)
    with pytest.raises(ValueError, match=r"--storage 'runs/x' is a relative path.*Fix: an absolute path .*s3://"):
        check_location("runs/x", "--storage", cluster=True)
    with pytest.raises(ValueError, match="--storage is empty"):
        check_location("", "--storage", cluster=False)
