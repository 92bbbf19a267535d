"""Training recipe pieces: the schedule, resumable batches, and a two-step run that resumes."""

import json

import torch

from explorer.igpt.train import TrainConfig, batch_indices, lr_at, main, progress


def test_schedule_warmup_then_cosine_to_floor():
    tc = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_frac=0.1)
    assert lr_at(0, 0.0, tc) == 1e-4  # (0 + 1) / 10 of the peak
    assert lr_at(10, progress(10, 0, tc), tc) < 1e-3
    assert abs(lr_at(60, 0.5, tc) - 0.55e-3) < 1e-12  # halfway: mean of peak and floor
    assert abs(lr_at(110, 1.0, tc) - 1e-4) < 1e-12
    # with a time budget, progress follows whichever is further along
    tc_t = TrainConfig(max_steps=1000, max_minutes=10)
    assert progress(100, 300, tc_t) == 0.5 and progress(800, 60, tc_t) == 0.8


def test_batches_cover_an_epoch_without_repeats_and_shard_by_rank():
    tc = TrainConfig(batch_size=4, seed=0)
    seen = torch.cat([batch_indices(s, 20, tc, 0, 1) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(20))
    # two processes split each global batch; together they see the same images
    both = torch.cat([batch_indices(3, 20, tc, r, 2) for r in range(2)])
    assert sorted(both.tolist()) == sorted(batch_indices(3, 20, tc, 0, 1).tolist())
    assert not torch.equal(batch_indices(5, 20, tc, 0, 1), batch_indices(0, 20, tc, 0, 1))


def test_two_steps_then_resume(tmp_path):
    args = ["--out", str(tmp_path), "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
            "--batch-size", "2", "--warmup-steps", "1", "--eval-images", "2",
            "--sample-images", "1", "--size", "16", "--threads", "1"]
    main(args + ["--max-steps", "2"])
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["step"] == 2 and ck["extra"]["model_config"]["n_positions"] == 256
    main(args + ["--max-steps", "3"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 3
    evals = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "eval_bpd" in e] == [2, 3]
    assert (tmp_path / "samples_step00003.png").exists()
    main(args + ["--max-steps", "3", "--export", str(tmp_path / "export"), "--export-only"])
    assert (tmp_path / "export" / "model.safetensors").exists()
    main(args + ["--eval-only"])
    rec = json.loads((tmp_path / "test_bpd_step00003.json").read_text())
    assert rec["test_images"] == 2 and 0 < rec["test_bpd"] < 4
