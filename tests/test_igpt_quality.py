"""Completion quality pieces (explorer.igpt.quality): expectations derived by hand."""

import pytest
import torch
from igpt_helpers import known_distribution_model

from explorer.igpt.quality import (
    GarmentCNN,
    agreement,
    classify,
    grey_input,
    nearest_neighbour_completion,
    sample_completions,
    stratified_indices,
    train_classifier,
)
from explorer.igpt.sampler import SampleConfig


def test_nearest_neighbour_of_a_training_image_is_itself():
    torch.manual_seed(0)
    train = torch.randint(0, 8, (50, 6, 5))
    done, idx = nearest_neighbour_completion(train[[7, 3, 42]], train, rows_kept=3)
    assert idx.tolist() == [7, 3, 42]
    assert torch.equal(done, train[[7, 3, 42]])  # the exact training image, bottom included


def test_nearest_neighbour_copies_the_closest_top_and_keeps_the_query_top():
    train = torch.zeros(3, 4, 2, dtype=torch.long)
    train[0, :2] = 0
    train[0, 2:] = 1  # bottom of image 0: all 1
    train[1, :2] = 5
    train[1, 2:] = 2
    train[2, :2] = 7
    train[2, 2:] = 3
    query = torch.full((1, 4, 2), 6)  # top rows all 6 but one pixel 5; squared distances:
    query[0, 0, 0] = 5  # image 1 (5s): 0 + 3 * 1 = 3; image 2 (7s): 4 + 3 * 1 = 7; image 0: 97
    done, idx = nearest_neighbour_completion(query, train, rows_kept=2)
    assert idx.tolist() == [1]
    assert torch.equal(done[0, :2], query[0, :2])
    assert torch.equal(done[0, 2:], torch.full((2, 2), 2))
    with pytest.raises(ValueError):
        nearest_neighbour_completion(query, train, rows_kept=4)


def test_stratified_indices_are_balanced_and_reproducible():
    labels = torch.arange(3).repeat(10)  # 0 1 2 0 1 2 ...
    a = stratified_indices(labels, 4, seed=1)
    assert torch.bincount(labels[a]).tolist() == [4, 4, 4]
    assert len(set(a.tolist())) == 12
    assert torch.equal(a, stratified_indices(labels, 4, seed=1))
    with pytest.raises(ValueError):
        stratified_indices(labels, 11)


def test_agreement_of_real_images_is_the_classifier_accuracy():
    # a classifier that reads the label off the top-left pixel: exact on real images
    class TopLeft(torch.nn.Module):
        def forward(self, x):  # (B, 1, H, W) in [0, 1]
            return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 7).round().long(), 8).float()

    tokens = torch.randint(0, 8, (20, 4, 4))
    labels = tokens[:, 0, 0].clone()
    assert agreement(classify(TopLeft(), tokens, 8), labels) == 1.0
    labels[:5] = (labels[:5] + 1) % 8  # 5 of 20 mislabelled
    assert agreement(classify(TopLeft(), tokens, 8), labels) == 0.75
    assert torch.equal(grey_input(torch.tensor([[[0, 7]]]), 8), torch.tensor([[[[0.0, 1.0]]]]))


def test_classifier_learns_a_separable_toy_task():
    # class 1: bright top half, class 0: bright bottom half (top/bottom: flips are left-right)
    tokens = torch.zeros(64, 8, 8, dtype=torch.long)
    labels = torch.arange(64) % 2
    tokens[labels == 1, :4] = 7
    tokens[labels == 0, 4:] = 7
    clf = train_classifier(tokens, labels, levels=8, epochs=15, batch_size=16, seed=0)
    assert isinstance(clf, GarmentCNN) and not clf.training
    assert agreement(classify(clf, tokens, 8), labels) == 1.0


def test_samples_keep_the_given_rows_and_follow_the_model():
    # the model always predicts colour 2 with probability ~1: every sampled pixel is 2
    probs = torch.tensor([1e-6, 1e-6, 1.0 - 3e-6, 1e-6])
    model = known_distribution_model(probs)
    query = torch.randint(0, 4, (5, 4, 4))  # 16 pixels = the helper model's positions
    done = sample_completions(model, query, rows_kept=1, cfg=SampleConfig(seed=0), batch_size=2)
    assert done.shape == (5, 4, 4)
    assert torch.equal(done[:, :1], query[:, :1])
    assert bool((done[:, 1:] == 2).all())
