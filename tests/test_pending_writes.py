"""The predict run's bound on pending writes (engine.pending): by count and by the bytes held."""
from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
import torch

from detection.engine.display import DisplayImages
from detection.engine.pending import PendingWrites, held_arrays


def done(value=None) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def test_held_arrays_counts_each_buffer_once_and_views_as_their_base():
    batch = torch.zeros(4, 10, dtype=torch.float32)  # 160 bytes
    image = np.zeros((5, 6, 3), np.uint8)  # 90 bytes
    held = held_arrays([batch[1:2], batch[3], image[1:], DisplayImages(overlay=image, viewer_jpeg=b"abcd"),
                        {"maps": torch.ones(3, dtype=torch.float64)}, ("text", 7)])
    assert sorted(held.values()) == [4, 24, 90, 160]


def test_pending_writes_wait_for_the_oldest_beyond_the_count():
    pending = PendingWrites(max_count=2, max_bytes=10**9)
    futures = [done(k) for k in range(4)]
    for future in futures:
        pending.add(future)
        pending.wait_within()
        assert len(pending) <= 2
    assert len(pending) == 2
    pending.wait_all()
    assert len(pending) == 0


def test_pending_writes_bounded_by_the_bytes_they_hold():
    arrays = [np.zeros(600, np.uint8) for _ in range(3)]
    pending = PendingWrites(max_count=8, max_bytes=1000, min_count=1)
    pending.add(done(), arrays[0])
    pending.wait_within()
    assert len(pending) == 1 and pending.held_bytes == 600
    pending.add(done(), arrays[0][:10])  # a view of the same buffer: nothing more is held
    pending.wait_within()
    assert len(pending) == 2 and pending.held_bytes == 600
    pending.add(done(), arrays[1])  # 1200 bytes: the oldest go until the rest fit
    pending.wait_within()
    assert len(pending) == 1 and pending.held_bytes == 600
    # min_count: that many stay pending (one per writer thread) whatever they hold
    busy = PendingWrites(max_count=8, max_bytes=1000, min_count=2)
    for array in arrays:
        busy.add(done(), array)
        busy.wait_within()
    assert len(busy) == 2 and busy.held_bytes == 1200


def test_pending_writes_raise_the_writers_error():
    failed: Future = Future()
    failed.set_exception(OSError(28, "No space left on device"))
    pending = PendingWrites(max_count=1)
    pending.add(failed)
    pending.add(done())
    with pytest.raises(OSError, match="No space"):
        pending.wait_within()
    with pytest.raises(ValueError, match="at least 1"):
        PendingWrites(max_count=0)


def test_writer_threads_run_torch_alone_and_the_setting_ends_with_the_run(tmp_path, monkeypatch):
    import threading

    from PIL import Image

    import detection.engine.predict_run as predict_run
    from detection.engine.image_files import OutputOptions
    from detection.models.registry import build_model

    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "in" / f"im{index}.png")
    seen: list[tuple[str, int]] = []
    original = predict_run.write_image_files

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_run, "write_image_files", recording)
    from detection.engine.predictor import Predictor

    model_threads: list[int] = []
    predict_tensors = Predictor.predict_tensors

    def counting(self, *args, **kwargs):  # the model's thread, batches 2 and 3 run beside the writers
        model_threads.append(torch.get_num_threads())
        return predict_tensors(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_tensors", counting)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    settings = predict_run.PredictSettings(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), device="cpu",
                                           workers=0, score_threshold=0.0, progress=False, batch_size=1,
                                           outputs=OutputOptions(overlays=True, overlay_size=40))
    summary = predict_run.run_predict(settings, model=build_model("detr-tiny").eval())
    assert summary.images == 3 and len(seen) == 3
    assert all(name != threading.current_thread().name and threads == 1 for name, threads in seen)
    # the probe (a model that cannot run is refused before the run), then 3 batches: the writers' setting
    # never reaches the model's thread
    assert model_threads == [2, 2, 2, 2]
    assert torch.get_num_threads() == 2  # this thread's, and the default of threads started now
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]
