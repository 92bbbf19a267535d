"""The shipped layer-wise probe of the offline iGPT (explorer.finetune.igpt_probe)."""

import json

from explorer.finetune.igpt_probe import (
    load_probe_asset,
    middle_layer_peak,
    probe_asset,
    probe_summary,
)
from explorer.finetune.probe import LayerwiseProbe


def test_middle_layer_peak_needs_a_best_block_before_the_last_and_a_real_drop():
    rises = LayerwiseProbe([1, 2, 3, 4], [0] * 4, [0.60, 0.70, 0.75, 0.80], "rises")
    peaks = LayerwiseProbe([1, 2, 3, 4], [0] * 4, [0.60, 0.80, 0.78, 0.70], "peaks")
    flat = LayerwiseProbe([1, 2, 3, 4], [0] * 4, [0.60, 0.802, 0.80, 0.80], "flat")
    assert not middle_layer_peak(rises)
    assert middle_layer_peak(peaks)
    assert not middle_layer_peak(flat)  # 0.2 points is inside the margin
    assert "peaks at block 2 of 4 (80.0%), the last block gives 70.0%" in probe_summary(peaks)
    assert probe_summary(rises).endswith("no middle-layer peak.")


def test_probe_asset_round_trip(tmp_path):
    bench = {
        "date_utc": "2026-11-25T13:00:00+00:00", "machine": "test",
        "layerwise": {"model": "dinov2", "resolution": [112, 112], "train_images": 20,
                      "test_images": 10, "depths": [1, 2], "val_acc": [0.5, 0.6],
                      "train_acc": [0.7, 0.8], "best_depth": 2, "wall_s": 1.0},
        "layerwise_igpt": {"model": "igpt", "checkpoint_step": 7, "depths": [1, 2, 3],
                           "val_acc": [0.4, 0.5, 0.45], "train_acc": [0.5, 0.6, 0.6],
                           "best_depth": 2, "wall_s": 2.0},
    }
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_asset(bench, "cmd")))
    probes, meta = load_probe_asset(path)
    assert [p.depths for p in probes] == [[1, 2, 3], [1, 2]]  # iGPT first, then DINOv2
    assert probes[0].val_acc == [0.4, 0.5, 0.45] and probes[1].train_acc == [0.7, 0.8]
    assert meta["igpt_checkpoint_step"] == 7 and meta["command"] == "cmd"
    assert "20 training images" in meta["split"] and "112 px" in meta["split"]
    assert load_probe_asset(tmp_path / "missing.json") == ([], {})
