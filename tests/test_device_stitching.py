"""Stitching on the model's device: byte-identical labels, batches across chunks, pinned copies, the writer.

The device code is torch on ``device``; here it runs with ``device="cpu"``, and the CUDA-only branch
(pinned host buffers, asynchronous copies guarded by events) runs on the CPU with the pinning and
the events replaced by stand-ins, so its logic is covered without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import zarr

from pfmseg_engine.errors import StorageError
from pfmseg_engine.inference import LabelOutput, predict_slide, stitch
from pfmseg_engine.inference import slide as slide_module
from pfmseg_engine.inference.writer import BackgroundWriter
from pfmseg_engine.slides import Slide, open_slide
from test_wsi_support import PixelModel, random_image
from testdata import CMU


def digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def label_digests(path) -> dict[str, str]:
    return {f"labels/{i}": digest(np.asarray(level[:])) for i, level in enumerate(LabelOutput(path).levels)}


def blob_slide() -> Slide:
    image = np.full((512, 768, 3), 240, np.uint8)
    image[100:400, 200:600] = random_image(300, 400, seed=9) // 4 + np.array([150, 60, 130], np.uint8)
    small = image.reshape(64, 8, 96, 8, 3).mean((1, 3)).astype(np.uint8)
    return Slide.from_array([image, small], mpp=1.0, name="blob", downsamples=[1.0, 8.0])


# Outputs of the numpy stitching this replaced (blend and accumulate on the host), run on these inputs with
# settings whose stride is the same under the old (patch multiple) and new (MONAI) stride rule. Labels and
# every pyramid level must stay byte-identical; ``inputs`` guards against a different JPEG decoder or random
# generator producing other pixels (then the comparison is meaningless and skipped). Tissue detection is
# off, so the references pin the stitching, not the tissue detector (``test_wsi`` covers skipping).
# Probabilities are not pinned: torch's exp may differ from numpy's in the last bit (see
# ``test_device_sums_and_labels_equal_the_numpy_stitching``: at most 1/255 in rare pixels).
REFERENCE = {
    "random_gaussian_w64_o50": {
        "slide": lambda: Slide.from_array(random_image(150, 230, seed=64), mpp=0.5, name="rand"),
        "inputs": ("rand", "720200f14e3b59fe"),
        "options": dict(window=64, overlap=0.5, blend="gaussian", chunk=64, tissue=False, probabilities=True),
        "windows": 28, "labels": {"labels/0": "34219525cbc4f40f"}},
    "random_constant_w32_o0_priority": {
        "slide": lambda: Slide.from_array(random_image(256, 200, seed=2), mpp=1.0, name="p"),
        "inputs": ("rand", "6d69a5bafc502c33"),
        "options": dict(window=32, overlap=0.0, blend="constant", chunk=48, tissue=False, probabilities=True,
                        priority_box=(150, 150, 60, 60)),
        "windows": 56, "labels": {"labels/0": "ebae78ca0b024fd3"}},
    "blob_w32_o50": {
        "slide": blob_slide, "inputs": ("tissue", "bdc9a6365d55421a"),
        "options": dict(window=32, overlap=0.5, chunk=64, tissue=False, probabilities=True),
        "windows": 1457, "labels": {"labels/0": "f9c174f7c395b56b", "labels/1": "b899f312871dd850",
                                    "labels/2": "8111f83086682b19"}},
    "random_region_resampled_w32": {
        "slide": lambda: Slide.from_array(random_image(256, 320, seed=7), mpp=0.5, name="r"),
        "inputs": ("rand", "e2dad6859581ab4e"),
        "options": dict(region=(96, 64, 300, 170), target_mpp=1.0, window=32, overlap=0.5, chunk=64, tissue=False,
                        probabilities=True, ngff="0.5", pyramid="nearest"),
        "windows": 30, "labels": {"labels/0": "5151905d155d0f48"}},
    "cmu_region_w128": {
        "slide": lambda: CMU, "inputs": ("cmu", "0f88f63efc00700c"),
        "options": dict(window=128, overlap=0.25, chunk=256, tissue=False, region=(0, 0, 1024, 768),
                        probabilities=True),
        "windows": 88, "labels": {"labels/0": "8efb028bf4da2256", "labels/1": "a79af74121fbed19",
                                  "labels/2": "3596f655f3e9a27c"}},
    "cmu_whole_w256": {
        "slide": lambda: CMU, "inputs": ("cmu", "0f88f63efc00700c"),
        "options": dict(window=256, overlap=0.25, chunk=512, batch_size=8, tissue=False),
        "windows": 192, "labels": {"labels/0": "059bbbeab4905cae", "labels/1": "75da555b035318bc",
                                   "labels/2": "16f89ee9d351c1fd", "labels/3": "3e592f1ea360fd60"}},
}


def input_digest(kind: str, slide) -> str:
    if kind == "cmu":
        with open_slide(slide) as opened:
            return digest(opened.readers[0][:, :])
    if kind == "tissue":
        return digest(random_image(300, 400, seed=9))
    return digest(np.asarray(slide.readers[0][:, :]))


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_labels_byte_identical_to_host_stitching(tmp_path, case):
    ref = REFERENCE[case]
    slide = ref["slide"]()
    kind, expected_input = ref["inputs"]
    if input_digest(kind, slide) != expected_input:
        pytest.skip("this platform decodes or generates other input pixels than the reference's")
    result = predict_slide(PixelModel(), slide, tmp_path, device="cpu", **ref["options"])
    assert result.windows_run == ref["windows"]
    assert label_digests(result.path) == ref["labels"]


def test_pinned_branch_runs_on_the_cpu_with_stand_ins(tmp_path, monkeypatch):
    """The CUDA path (pinned staging ring, non_blocking copies, events) gives the same bytes."""
    events, pinned = [], []

    class Event:
        def __init__(self):
            self.waited = 0

        def synchronize(self):
            self.waited += 1

    def fake_event():
        events.append(Event())
        return events[-1]

    def fake_pinned(shape, dtype):
        pinned.append(tuple(shape))
        return torch.empty(tuple(shape), dtype=dtype)

    image = random_image(200, 260, seed=11)
    options = dict(window=32, overlap=0.5, chunk=64, tissue=False, probabilities=True, batch_size=5)
    plain = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="a"), tmp_path / "plain", **options)
    monkeypatch.setattr(slide_module, "pin_memory", lambda device: True)
    monkeypatch.setattr(stitch, "pinned_empty", fake_pinned)
    monkeypatch.setattr(stitch, "new_event", fake_event)
    fake = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="a"), tmp_path / "pinned", **options)
    assert pinned and events and (5, 32, 32, 3) in pinned  # staging buffers of a whole batch
    assert sum(e.waited for e in events) > 0  # staging slots and host copies waited for their events

    def tree(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    assert tree(plain.path) == tree(fake.path)


def test_staging_ring_waits_for_the_copy_before_reusing_a_buffer(monkeypatch):
    log = []

    class Event:
        def __init__(self, n):
            self.n = n

        def synchronize(self):
            log.append(("wait", self.n))

    count = iter(range(100))
    monkeypatch.setattr(stitch, "pinned_empty", lambda shape, dtype: torch.empty(tuple(shape), dtype=dtype))
    monkeypatch.setattr(stitch, "new_event", lambda: Event(next(count)))
    staging = stitch.Staging(torch.device("cpu"), batch_size=4, window=8, pinned=True, slots=2)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8), rng.integers(0, 255, (1, 8, 8, 3), dtype=np.uint8)
    first = staging.upload([a, b])  # a batch spanning two chunks' window arrays
    np.testing.assert_array_equal(first.numpy(), np.concatenate([a, b]))
    staging.upload([a])
    assert log == []  # two slots: neither reused yet
    third = staging.upload([b])
    assert log == [("wait", 0)]  # slot 0 reused only after the event of its first copy
    np.testing.assert_array_equal(third.numpy(), b)
    with pytest.raises(ValueError, match="does not fit"):
        staging.upload([a, a])


def test_host_copy_waits_for_its_event_only_when_pinned(monkeypatch):
    waited = []

    class Event:
        def synchronize(self):
            waited.append(True)

    monkeypatch.setattr(stitch, "pinned_empty", lambda shape, dtype: torch.empty(tuple(shape), dtype=dtype))
    monkeypatch.setattr(stitch, "new_event", Event)
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    copy = stitch.HostCopy(tensor[:, 1:], pinned=True)
    assert copy.tensor.data_ptr() != tensor.data_ptr()
    np.testing.assert_array_equal(copy.numpy(), tensor[:, 1:].numpy())
    assert waited == [True]
    plain = stitch.HostCopy(tensor, pinned=False)
    assert plain.numpy().base is not None and waited == [True]  # the CPU tensor itself, no copy, no wait


def numpy_stitch(logits, boxes, weights, shape):
    """The replaced host stitching, verbatim: weighted sums and weight sum, then the labels/probabilities."""
    k = logits.shape[1]
    acc = np.zeros((k + 1, *shape), np.float32)
    for (y0, y1, x0, x1), window in zip(boxes, logits, strict=True):
        h, w = y1 - y0, x1 - x0
        target = acc[:, y0:y1, x0:x1]
        target[:k] += window[:, :h, :w] * weights[:h, :w]
        target[k] += weights[:h, :w]
    return acc


def numpy_finish(total, k):
    wsum = total[k]
    covered = wsum > 0
    logits = total[:k] / np.where(covered, wsum, 1.0)
    labels = np.where(covered, logits.argmax(0) + 1, 0).astype(np.uint8)
    shifted = logits - logits.max(axis=0, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    probs = np.where(covered, np.round(shifted.astype(np.float32) * 255.0), 0).astype(np.uint8)
    return labels, probs


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_device_sums_and_labels_equal_the_numpy_stitching(k):
    from pfmseg_engine.inference.window import blend_weights

    rng = np.random.default_rng(k)
    window, shape = 16, (40, 44)
    boxes = [(y, min(y + window, shape[0]), x, min(x + window, shape[1]))
             for y in range(0, 30, 6) for x in range(0, 34, 6)]
    logits = (rng.standard_normal((len(boxes), k, window, window)) * 3).astype(np.float32)
    logits[:, :, ::7] = logits[:, :1, ::7]  # exact ties between classes: the first class must win
    weights = blend_weights(window, "gaussian")
    stitcher = stitch.Stitcher(weights, k, batch_size=4, device=torch.device("cpu"), max_shape=shape)
    acc = stitcher.zeros(*shape)
    for start in range(0, len(boxes), 4):  # batches of 4, the last one short
        batch = torch.from_numpy(logits[start:start + 4])
        stitcher.add(batch, [(acc, y0, y1, x0, x1) for y0, y1, x0, x1 in boxes[start:start + 4]])
    expected = numpy_stitch(logits, boxes, weights, shape)
    assert np.array_equal(acc.numpy(), expected)  # bit for bit: same products, same order of sums
    expected[:, 35:, 40:] = 0  # a corner no window reached
    acc[:, 35:, 40:] = 0
    labels, probs = stitcher.finish(acc.clone(), probabilities=True)
    want_labels, want_probs = numpy_finish(expected, k)
    np.testing.assert_array_equal(labels.numpy(), want_labels)
    assert labels.numpy()[35:, 40:].max() == 0 and probs.numpy()[:, 35:, 40:].max() == 0
    diff = np.abs(probs.numpy().astype(int) - want_probs.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # torch's exp may differ from numpy's in the last bit
    stitcher.release(acc)
    again = stitcher.zeros(30, 20)
    assert again.data_ptr() == acc.data_ptr() and not again.any()  # recycled and zeroed


class BatchRecorder(PixelModel):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return super().forward(x)


def test_batches_span_chunk_boundaries(tmp_path):
    image = random_image(300, 280, seed=5)
    model = BatchRecorder()
    result = predict_slide(model, Slide.from_array(image, mpp=1.0), tmp_path, window=32, overlap=0.25, chunk=64,
                           tissue=False, batch_size=7)
    n = result.windows_run
    assert model.sizes == [7] * (n // 7) + ([n % 7] if n % 7 else [])  # only the very last batch is short
    per_chunk = sum(math.ceil(len(chunk.windows) / 7) for chunk in result.slide_plan.order)
    assert len(model.sizes) == math.ceil(n / 7) < per_chunk  # batching chunk by chunk would call it more often


def test_reader_pool_follows_the_cpu_affinity(monkeypatch):
    monkeypatch.setattr(slide_module.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert slide_module.available_cpus() == 3


def test_writer_keeps_order_and_stops_at_the_first_error():
    writer = BackgroundWriter(maxsize=2)
    done = []

    def fail():
        raise StorageError("Writing '/out' failed: the disk is full.")

    writer.submit(done.append, 1)
    writer.submit(done.append, 2)
    writer.wait()
    assert done == [1, 2]
    writer.submit(fail)
    writer.submit(done.append, 3)  # dropped: nothing after a failed write (no "done" record for unwritten data)
    with pytest.raises(StorageError, match="disk is full"):
        writer.wait()
    with pytest.raises(StorageError, match="disk is full"):
        writer.submit(done.append, 4)
    writer.close()
    assert done == [1, 2] and writer.closed


def test_a_failed_write_records_only_chunks_whose_data_is_in_the_store(tmp_path, monkeypatch):
    from pfmseg_engine.labelstore import omezarr

    image = random_image(256, 320, seed=8)
    options = dict(window=32, overlap=0.5, chunk=64, tissue=False)
    reference = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="w"), tmp_path / "ref", **options)
    real_write, calls = omezarr.LabelStore.write, []

    def write(self, box, labels, probs=None):
        calls.append(box)
        if len(calls) == 6:
            raise StorageError("Writing the OME-Zarr output failed: the disk is full.")
        return real_write(self, box, labels, probs)

    monkeypatch.setattr(omezarr.LabelStore, "write", write)
    with pytest.raises(StorageError, match="disk is full"):
        predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="w"), tmp_path / "out", **options)
    partial = tmp_path / "out" / "w.ome.zarr.partial"
    records = [json.loads(line) for line in (partial / ".pfmseg_work" / "done.jsonl").read_text().splitlines()]
    done = [tuple(r["chunk"]) for r in records if "nonempty" in r]
    assert 0 < len(done) < 6 and (calls[5][0] // 64, calls[5][2] // 64) not in done
    stored = zarr.open_group(str(partial), mode="r")
    expected = np.asarray(LabelOutput(reference.path).levels[0][:])
    coarse = np.asarray(LabelOutput(reference.path).levels[1][:])
    for cy, cx in done:  # every chunk recorded as done is in the store, pyramid included
        box = np.s_[cy * 64:(cy + 1) * 64, cx * 64:(cx + 1) * 64]
        np.testing.assert_array_equal(np.asarray(stored["0"][box]), expected[box])
        box = np.s_[cy * 32:(cy + 1) * 32, cx * 32:(cx + 1) * 32]
        np.testing.assert_array_equal(np.asarray(stored["1"][box]), coarse[box])
    monkeypatch.setattr(omezarr.LabelStore, "write", real_write)
    resumed = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="w"), tmp_path / "out", **options)
    assert resumed.resumed and resumed.chunks_run == resumed.chunks_total - len(done)
    for got, want in zip(LabelOutput(resumed.path).levels, LabelOutput(reference.path).levels, strict=True):
        np.testing.assert_array_equal(np.asarray(got[:]), np.asarray(want[:]))


def test_tile_cache_decodes_each_block_once():
    from pfmseg_engine.inference.tilecache import TileCache

    class Counting:
        def __init__(self, array):
            self.array, self.shape, self.reads = array, array.shape, 0

        def __getitem__(self, key):
            self.reads += 1
            return self.array[key]

    image = random_image(300, 410, seed=1)
    source = Counting(image)
    cache = TileCache(source, (128, 128))
    np.testing.assert_array_equal(cache[10:200, 50:400], image[10:200, 50:400])
    first = source.reads
    np.testing.assert_array_equal(cache[100:300, 300:410], image[100:300, 300:410])
    np.testing.assert_array_equal(cache[:, :], image)
    assert first == 2 * 4 and source.reads == cache.decoded == 3 * 4  # every 128 px block read once
    small = TileCache(Counting(image), (128, 128), capacity=2 * 128 * 128 * 3)
    np.testing.assert_array_equal(small[:, :], image)  # still right when blocks are evicted


def test_pyramid_updates_are_batched_into_rectangles_with_the_same_result(tmp_path):
    from pfmseg_engine.labelstore.omezarr import LabelStore
    from pfmseg_engine.labelstore.pyramid import merge_boxes

    rng = np.random.default_rng(3)
    chosen = [(cy, cx) for cy in range(5) for cx in range(6) if rng.random() < 0.7]
    boxes = [(cy * 32, min(cy * 32 + 32, 150), cx * 32, min(cx * 32 + 32, 190)) for cy, cx in chosen]
    merged = merge_boxes(boxes)
    covered = np.zeros((150, 190), int)
    for y0, y1, x0, x1 in merged:
        covered[y0:y1, x0:x1] += 1
    wanted = np.zeros((150, 190), int)
    for y0, y1, x0, x1 in boxes:
        wanted[y0:y1, x0:x1] = 1
    np.testing.assert_array_equal(covered, wanted)  # the same pixels, each once
    assert len(merged) < len(boxes)
    labels = rng.integers(1, 4, (150, 190), dtype=np.uint8)
    stores = [LabelStore(tmp_path / f"{i}.zarr", shape=(150, 190), chunk=32, num_classes=3, probabilities=False,
                         pyramid_interval=interval) for i, interval in enumerate((0.0, 3600.0))]
    for store in stores:
        for y0, y1, x0, x1 in boxes:
            store.write((y0, y1, x0, x1), labels[y0:y1, x0:x1])
    assert not stores[0].pyramid_pending and stores[1].pyramid_pending
    assert stores[1].is_complete(boxes[0])  # the first write updates the pyramid at once (a viewer sees it)
    assert not stores[1].is_complete(boxes[-1]) and stores[0].is_complete(boxes[-1])
    stores[1].flush_pyramid()
    assert stores[1].is_complete(boxes[-1])
    for a, b in zip(stores[0].levels, stores[1].levels, strict=True):
        np.testing.assert_array_equal(np.asarray(a[:]), np.asarray(b[:]))
