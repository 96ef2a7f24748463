"""A prediction run that stops part-way is continued by the same command: the images it finished
are not predicted again, and the submission equals an uninterrupted run's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import inference
from conftest import random_checkpoint
from journal import PredictionJournal, run_key


def test_the_journal_keeps_finished_images_of_its_own_key(tmp_path: Path) -> None:
    path = tmp_path / "sub.json.partial"
    with PredictionJournal(path, "k1") as journal:
        journal.add(1, [{"score": 0.9}])
        journal.finish(1)
        journal.add(2, [{"score": 0.8}])  # a streamed image's first window, then the crash
    with open(path, "a") as handle:
        handle.write('{"image": 2, "run": 1, "resu')  # a line cut off mid-write
    with PredictionJournal(path, "k1") as journal:
        assert journal.done == {1: 1} and not journal.stale
        journal.add(2, [{"score": 0.7}])
        journal.finish(2)
    again = PredictionJournal(path, "k1")
    assert again.done == {1: 1, 2: 2}
    assert list(again.replay({1, 2})) == [[{"score": 0.9}], [{"score": 0.7}]]  # not the unfinished 0.8
    assert list(again.replay({3})) == []
    other = PredictionJournal(path, "k2")
    assert other.stale and other.done == {}
    with other:
        pass
    assert PredictionJournal(path, "k2").done == {} and not PredictionJournal(path, "k2").stale
    other.discard()
    assert not path.exists()


def test_the_key_changes_with_the_checkpoint_file_and_the_settings(tmp_path: Path) -> None:
    ckpt = tmp_path / "a.pth"
    ckpt.write_bytes(b"1")
    first = run_key([ckpt], tile=256)
    assert run_key([ckpt], tile=256) == first and run_key([ckpt], tile=128) != first
    ckpt.write_bytes(b"22")  # retrained: another file at the same path
    assert run_key([ckpt], tile=256) != first


def _items(path: Path) -> list[tuple]:
    return sorted((r["image_id"], r["category_id"], round(r["score"], 5), r["segmentation"]["counts"])
                  for r in json.loads(Path(path).read_text()))


def test_a_stopped_run_continues_where_it_stopped(tmp_path: Path, shallow: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "big.tif", rng.integers(0, 255, (300, 340, 3), dtype=np.uint8))  # streamed
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(folder / name)
    common = ["--checkpoint", str(random_checkpoint(tmp_path / "best.pth")), "--test_dir", str(folder), "--num_workers", "0",
              "--window", "300", "--box_score_thresh", "0"]
    reference = _items(inference.main([*common, "--output", str(tmp_path / "ref" / "sub.json")]))
    assert {i for i, *_ in reference} == {1, 2, 3}
    output = tmp_path / "out" / "sub.json"
    journal = Path(f"{output}.partial")

    predicted, streamed = [], []
    real_each, real_stream = inference.predict_each, inference._stream

    def counted_each(*args, **kwargs):
        for image_id, found in real_each(*args, **kwargs):
            predicted.append(image_id)
            yield image_id, found

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C once the small images are done, before the slide

    monkeypatch.setattr(inference, "predict_each", counted_each)
    monkeypatch.setattr(inference, "_stream", crash)
    with pytest.raises(KeyboardInterrupt):
        inference.main([*common, "--output", str(output)])
    assert sorted(predicted) == [1, 2] and journal.exists() and not output.exists()

    predicted.clear()
    monkeypatch.setattr(inference, "_stream", lambda *a, **k: (streamed.append(a[0]["id"]), real_stream(*a, **k)))
    monkeypatch.setattr(PredictionJournal, "discard", lambda self: None)  # as if it stopped before its last step
    # another --batch_size (the out-of-memory fix) continues the run: it changes how, not what, it predicts
    assert _items(inference.main([*common, "--output", str(output), "--batch_size", "2"])) == reference
    assert predicted == [] and streamed == [3]  # only the slide was predicted

    predicted.clear()
    streamed.clear()
    monkeypatch.undo()
    monkeypatch.setattr(inference, "predict_each", counted_each)
    assert _items(inference.main([*common, "--output", str(output)])) == reference  # every image replayed
    assert predicted == [] and not journal.exists()
    assert _items(inference.main([*common, "--output", str(output), "--box_score_thresh", "0.5"])) != reference
    assert sorted(predicted) == [1, 2]  # other settings: nothing replayed


def test_a_replaced_image_is_predicted_again_alone(tmp_path: Path, shallow: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The fix for a bad image (re-exported, or its place taken) used to make the whole record
    stale: every finished image was predicted again. Now only the image that changed is."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(folder / name)
    output = tmp_path / "out" / "sub.json"
    common = ["--checkpoint", str(random_checkpoint(tmp_path / "best.pth")), "--test_dir", str(folder),
              "--num_workers", "0", "--batch_size", "1", "--box_score_thresh", "0", "--output", str(output)]
    predicted = []
    real_each = inference.predict_each

    def stops_after_two(*args, **kwargs):
        for image_id, found in real_each(*args, **kwargs):
            if len(predicted) == 2:
                raise KeyboardInterrupt
            predicted.append(image_id)
            yield image_id, found

    monkeypatch.setattr(inference, "predict_each", stops_after_two)
    with pytest.raises(KeyboardInterrupt):
        inference.main(common)
    assert predicted == [1, 2]
    Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(folder / "b.png")  # re-exported
    predicted.clear()
    inference.main(common)
    assert predicted == [2, 3]  # a.png replayed
    assert output.exists() and not Path(f"{output}.partial").exists()
