"""Skeleton drawings on the real mini images: files that open, limbs where and in the colour expected."""

import json

import cv2
import numpy as np
import pytest

from distpose.errors import UserError
from distpose.eval.draw import (
    CENTRE_COLOUR,
    LEFT_COLOUR,
    RIGHT_COLOUR,
    draw_skeletons,
    grid,
    limb_colour,
    save_image,
)
from distpose.keypoints import INDEX, SKELETON


def people_by_image(coco_mini):
    doc = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    files = {im["id"]: im["file_name"] for im in doc["images"]}
    people = {}
    for a in doc["annotations"]:
        if a["num_keypoints"] > 0:
            people.setdefault(files[a["image_id"]], []).append(np.array(a["keypoints"], float).reshape(17, 3))
    return people


def test_limb_colours_follow_the_sides():
    assert limb_colour(INDEX["left_knee"], INDEX["left_ankle"]) == LEFT_COLOUR
    assert limb_colour(INDEX["right_shoulder"], INDEX["right_elbow"]) == RIGHT_COLOUR
    assert limb_colour(INDEX["left_hip"], INDEX["right_hip"]) == CENTRE_COLOUR
    # ankle-knee, knee-hip, shoulder-hip, shoulder-elbow, elbow-wrist, eye-ear, ear-shoulder
    assert sum(limb_colour(a, b) == LEFT_COLOUR for a, b in SKELETON) == 7


def test_drawings_on_real_images_are_written_and_show_the_limbs(coco_mini, tmp_path):
    drawn, matches, limbs = [], 0, 0
    for file_name, people in people_by_image(coco_mini).items():
        image = cv2.imread(str(coco_mini / "val2017" / file_name))
        canvas = draw_skeletons(image, np.stack(people))
        out = save_image(tmp_path / f"{file_name[:-4]}.png", canvas)
        reopened = cv2.imread(str(out))
        assert reopened.shape == image.shape and np.array_equal(reopened, canvas)  # PNG is lossless
        for person in people:
            for a, b in SKELETON:
                if person[a, 2] > 0 and person[b, 2] > 0 and np.linalg.norm(person[a, :2] - person[b, :2]) > 12:
                    mid = np.rint((person[a, :2] + person[b, :2]) / 2).astype(int)
                    pixel = canvas[mid[1], mid[0]].astype(int)
                    limbs += 1
                    matches += np.abs(pixel - limb_colour(a, b)).max() < 60
        drawn.append(canvas)
    # Each limb's own colour at its midpoint, but where another limb or a joint dot crosses it.
    assert limbs > 50 and matches / limbs > 0.9
    sheet = grid(drawn, columns=2)
    path = save_image(tmp_path / "grid.jpg", sheet)
    assert cv2.imread(str(path)).shape == (2 * 240, 2 * 320, 3)


def test_unlabelled_joints_are_not_drawn():
    image = np.zeros((100, 100, 3), np.uint8)
    person = np.zeros((17, 3))
    person[INDEX["left_hip"]] = [20, 50, 2]
    person[INDEX["left_knee"]] = [20, 90, 0]  # unlabelled: neither it nor its limb appears
    canvas = draw_skeletons(image, person[None])
    assert canvas[70, 20].sum() == 0 and canvas[50, 20].sum() > 0


def test_bad_output_name(tmp_path):
    with pytest.raises(UserError, match="written as .png or .jpg"):
        save_image(tmp_path / "x.gif", np.zeros((4, 4, 3), np.uint8))
