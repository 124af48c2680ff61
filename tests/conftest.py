from pathlib import Path

import pytest

COCO_MINI = Path(__file__).parent / "data" / "coco_val2017_mini"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return COCO_MINI
