"""The AVA pieces fit together on the synthetic AVA-format data: files → keyframes → clips with boxes → the RoI
detector (forward and backward) → rows for the frame-mAP evaluator. An oracle that scores each test box with its
true actions must reach mAP 1, so keys, boxes and class columns line up from the CSV to the evaluator."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from datasets.ava.dataset import AVAClipConfig, AVAKeyframes, collate_keyframes, group_keyframes
from datasets.ava.files import keep_label_map_actions, read_ava_csv, read_excluded_timestamps, read_label_map
from datasets.ava.splits import AVADataConfig
from datasets.synthetic.ava import ensure_synthetic_ava
from datasets.video_dataset import DataConfig, model_input
from engine.eval.ava_map import dense_to_rows, frame_average_precision
from engine.eval.detection import score_keyframes
from models.detection import ActionDetector, DetectorConfig, detection_loss
from models.vit import ViTConfig

NUM_CLASSES = 7  # the synthetic action ids run 1..7


@pytest.fixture(scope="module")
def ava(tmp_path_factory):
    paths = ensure_synthetic_ava(tmp_path_factory.mktemp("ava"))
    meta = json.loads(paths.meta.read_text())
    cfg = AVAClipConfig(fps=meta["fps"], clip_len=8, sampling_rate=1, train_short_side=64, crop=64,
                        test_short_side=64, num_classes=NUM_CLASSES)
    return paths, cfg, read_label_map(paths.label_map)


def keyframes(paths, split: str, label_map, num_classes=NUM_CLASSES, detections=False):
    files = paths.split(split)
    if detections:
        table = read_ava_csv(files["detections"], kind="detections")
    else:
        table, _ = keep_label_map_actions(read_ava_csv(files["csv"], kind="groundtruth"), label_map)
    return group_keyframes(table, num_classes, read_excluded_timestamps(files["excluded"]))


def test_training_batches_run_through_the_detector_forward_and_backward(ava):
    paths, cfg, label_map = ava
    train = AVAKeyframes(paths.root, keyframes(paths, "train", label_map), cfg, train=True)
    batch = collate_keyframes([train[i] for i in range(4)])
    assert not batch["failures"] and batch["video"].shape == (4, 3, 8, 64, 64)
    assert batch["labels"].sum(dim=1).min() >= 1  # every ground-truth box has an evaluated action
    model = ActionDetector(DetectorConfig(encoder=ViTConfig(arch="vit_debug", num_frames=8, img_size=64,
                                                            patch_size=8), num_classes=NUM_CLASSES))
    logits = model(model_input(batch["video"], DataConfig()), batch["rois"])
    assert logits.shape == (batch["rois"].shape[0], NUM_CLASSES)
    detection_loss(logits, batch["labels"]).backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_an_oracle_on_the_ground_truth_boxes_scores_map_1(ava):
    paths, cfg, label_map = ava
    truth = keyframes(paths, "val", label_map)
    test = AVAKeyframes(paths.root, truth, cfg, train=False)
    class_ids = sorted(label_map)
    rows_keys, rows_boxes, rows_scores = [], [], []
    for index in range(len(test)):
        item = test[index]
        keyframe = test.keyframes[item["index"]]
        assert item["boxes"].shape[0] == len(keyframe.boxes)
        rows_keys += [keyframe.key] * len(keyframe.boxes)
        rows_boxes.append(keyframe.boxes)
        rows_scores.append(item["labels"][:, [i - 1 for i in class_ids]].numpy())  # the true actions as scores
    det = dense_to_rows(rows_keys, np.concatenate(rows_boxes), np.concatenate(rows_scores), class_ids)
    gt_table, _ = keep_label_map_actions(read_ava_csv(paths.val_csv, kind="groundtruth"), label_map)
    result = frame_average_precision(gt_table.keys(), gt_table.boxes, gt_table.action, *det, class_ids,
                                     excluded_keys=read_excluded_timestamps(paths.val_excluded))
    assert result["mAP"] == pytest.approx(1.0)


def test_detected_boxes_are_test_items_and_random_scores_stay_below_the_oracle(ava):
    paths, cfg, label_map = ava
    detected = keyframes(paths, "val", label_map, detections=True)
    test = AVAKeyframes(paths.root, detected, cfg, train=False)
    assert all(isinstance(test[i], dict) and test[i]["video"].shape[-2:] == (64, 80) for i in range(3))
    class_ids = sorted(label_map)
    generator = np.random.default_rng(0)
    keys = [k.key for k in detected for _ in k.boxes]
    boxes = np.concatenate([k.boxes for k in detected])
    det = dense_to_rows(keys, boxes, generator.random((len(boxes), len(class_ids))), class_ids)
    gt_table, _ = keep_label_map_actions(read_ava_csv(paths.val_csv, kind="groundtruth"), label_map)
    result = frame_average_precision(gt_table.keys(), gt_table.boxes, gt_table.action, *det, class_ids,
                                     excluded_keys=read_excluded_timestamps(paths.val_excluded))
    assert 0 < result["mAP"] < 0.9


@pytest.mark.parametrize("times_box_score", [False, True])
def test_scores_are_the_sigmoid_optionally_times_the_detectors_box_score(ava, times_box_score):
    paths, cfg, label_map = ava
    detected = keyframes(paths, "val", label_map, detections=True)[:5]
    data = AVADataConfig(**dataclasses.asdict(cfg))  # with the normalization the scorer applies
    test = AVAKeyframes(paths.root, detected, data, train=False)

    def forward(video, rois):  # logit 0 for every class: sigmoid 1/2
        return torch.zeros(rois.shape[0], NUM_CLASSES)

    result = score_keyframes(forward, test, sorted(label_map), micro_batch=2, num_workers=0,
                             device=torch.device("cpu"), dtype=torch.float32, times_box_score=times_box_score)
    box_scores = np.concatenate([k.scores for k in detected]).astype(np.float64)
    assert box_scores.min() < 1  # the detector's scores, not ground truth's ones
    expected = 0.5 * (box_scores if times_box_score else np.ones_like(box_scores))
    assert result.scores.shape == (len(box_scores), len(label_map))
    assert np.allclose(result.scores, expected[:, None])
